"""The report's words on capacity searches (`load: {type: capacity}`): each backend's verdict with its bracket, and,
where several searched one workload, who holds the most and whether that lead is beyond the searches' resolution."""

from __future__ import annotations

from collections.abc import Callable

from harness.records import CapacityResult
from harness.results.capacity import fmt_load
from harness.results.runs import CellView


def capacity_notes(cells: list[CellView], label: Callable[[CellView], str]) -> list[str]:
    searched = [(c, cap) for c in cells if c.ok and (cap := c.cell.capacity) is not None]
    notes = [f"{label(c)} {cap.verdict}" for c, cap in searched]
    ranked = sorted(((c, cap, rps) for c, cap in searched if (rps := cap.capacity_rps) is not None),
                    key=lambda x: -x[2])
    if len(ranked) >= 2:
        (leader, first, _), (runner, second, _) = ranked[0], ranked[1]
        order = ", ".join(f"{label(c)} {rps:.3g}" for c, _, rps in ranked)
        held = first.capacity if beyond(first, second) else None
        notes.append(f"Capacity at the slo (req/s): {order}; {label(leader)}'s lead is "
                     + (f"beyond the searches' resolution (it held {fmt_load(held, first.search)}, which "
                        f"{label(runner)} failed at)" if held is not None
                        else "within the searches' resolution (their brackets overlap)"))
    return notes


def beyond(first: CapacityResult, second: CapacityResult) -> bool:
    """The searches' uncertainty is their brackets: the lead is real when the leader held a load the runner-up failed
    at (comparable only when both searched the same quantity)."""
    return (first.search == second.search and second.fails_at is not None and first.capacity is not None
            and first.capacity >= second.fails_at)
