"""The report's words on capacity searches (`load: {type: capacity}`): each backend's verdict with its bracket, and,
where several searched one workload, who holds the most and whether that lead is beyond the searches' resolution."""

from __future__ import annotations

from collections.abc import Callable

from harness.results.capacity import fmt_value
from harness.results.runs import CellView


def capacity_notes(cells: list[CellView], label: Callable[[CellView], str]) -> list[str]:
    searched = [c for c in cells if c.ok and c.cell.capacity is not None]
    notes = [f"{label(c)} {c.cell.capacity.verdict}" for c in searched]
    ranked = sorted((c for c in searched if c.cell.capacity.capacity_rps is not None),
                    key=lambda c: -c.cell.capacity.capacity_rps)
    if len(ranked) >= 2:
        first, second = ranked[0].cell.capacity, ranked[1].cell.capacity
        order = ", ".join(f"{label(c)} {c.cell.capacity.capacity_rps:.3g}" for c in ranked)
        # The searches' uncertainty is their brackets: the lead is real when the leader held a load the runner-up
        # failed at (comparable only when both searched the same quantity).
        beyond = (first.search == second.search and second.fails_at is not None
                  and first.capacity is not None and first.capacity >= second.fails_at)
        notes.append(f"Capacity at the slo (req/s): {order}; {label(ranked[0])}'s lead is "
                     + ("beyond the searches' resolution (it held " + fmt_value(first.capacity, first.search)
                        + f", which {label(ranked[1])} failed at)" if beyond
                        else "within the searches' resolution (their brackets overlap)"))
    return notes
