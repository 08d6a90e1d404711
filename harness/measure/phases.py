"""Phases derived from the requests' own timestamps, never marked by backends: what splits the resource samples.

A request is in prefill from its send to its first token and in decode from its first token to its last. Under
concurrent load requests overlap, so the phases are unions: `prefill` is the time when any request was waiting for
its first token; `decode` the time when some request was decoding and none was in prefill; `idle` (added by the
monitor) the rest of the measured time after `load`, which the worker marks around backend.start().
"""

from __future__ import annotations

from collections.abc import Iterable

from harness.records import RequestRecord

Interval = tuple[float, float]


def union(intervals: Iterable[Interval]) -> list[Interval]:
    out: list[list[float]] = []
    for s, e in sorted(i for i in intervals if i[1] > i[0]):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def subtract(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """a minus b, both unions (sorted, disjoint)."""
    out = []
    for s, e in a:
        for bs, be in b:
            if be <= s or bs >= e:
                continue
            if bs > s:
                out.append((s, bs))
            s = max(s, be)
            if s >= e:
                break
        if s < e:
            out.append((s, e))
    return out


def request_phases(records: Iterable[RequestRecord], load: Interval | None = None) -> dict[str, list[Interval]]:
    records = [r for r in records if r.chunk_times]
    prefill = union((r.t_send, r.chunk_times[0]) for r in records)
    decode = subtract(union((r.chunk_times[0], r.chunk_times[-1]) for r in records), prefill)
    phases = {"prefill": prefill, "decode": decode}
    if load is not None:
        phases = {"load": [load], **{k: subtract(v, [load]) for k, v in phases.items()}}
    return {k: v for k, v in phases.items() if v}
