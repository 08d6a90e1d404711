"""A request trace in the mooncake format (JSONL, one request a line: `timestamp` in ms, `input_length`,
`output_length`, `hash_ids`), read and checked, and the prompts that replay it.

Requests whose rows share a hash_id share that block of prompt (`block_tokens` tokens of seeded text per hash id),
as the trace's own requests shared a prefix; the rest of a request's `input_length` beyond its blocks is its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.config.scenario import TraceLoad
from harness.inputs.exact import Exact, PromptError
from harness.records import PromptEntry


class TraceError(ValueError):
    """The trace cannot be replayed; the message names the file and the row."""


@dataclass(frozen=True)
class TraceRow:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] = ()
    line: int = 0  # the row's line in the file (blank lines are skipped), for messages about it


def read_trace(path: Path) -> list[TraceRow]:
    """Every row of the trace, checked: a JSON object per non-blank line with a numeric timestamp that never goes
    back, positive lengths and integer hash_ids."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise TraceError(f"{path}: no such trace file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(f"{path}: cannot read the trace: {getattr(e, 'strerror', None) or e}") from None
    rows: list[TraceRow] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise TraceError(f"{where}: not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise TraceError(f"{where}: expected an object with timestamp, input_length, output_length")
        row = TraceRow(_number(d, "timestamp", where, 0), int(_number(d, "input_length", where, 1, integer=True)),
                       int(_number(d, "output_length", where, 1, integer=True)),
                       _hash_ids(d.get("hash_ids", []), where), n)
        if rows and row.timestamp_ms < rows[-1].timestamp_ms:
            raise TraceError(f"{where}: timestamp {row.timestamp_ms:g} is before the previous row's "
                             f"{rows[-1].timestamp_ms:g}: a trace's times must not go back")
        rows.append(row)
    if not rows:
        raise TraceError(f"{path}: the trace has no rows")
    return rows


def _number(d: dict, key: str, where: str, low: float, integer: bool = False) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and v != int(v)) or not v >= low \
            or not np.isfinite(v):
        kind = "an integer" if integer else "a number"
        raise TraceError(f"{where}: {key}: expected {kind} ≥ {low:g}, got {json.dumps(v)}")
    return float(v)


def _hash_ids(v, where: str) -> tuple[int, ...]:
    if not isinstance(v, list) or any(isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in v):
        raise TraceError(f"{where}: hash_ids: expected a list of integers ≥ 0, got {json.dumps(v)[:80]}")
    return tuple(v)


def arrival_offsets(rows: list[TraceRow], speedup: float = 1.0) -> list[float]:
    """Each row's send time in seconds after the first row's."""
    t0 = rows[0].timestamp_ms
    return [(r.timestamp_ms - t0) / 1e3 / speedup for r in rows]


def trace_prompts(exact: Exact, load: TraceLoad, warmup: int, num_requests: int, count: int,
                  seed: int) -> list[PromptEntry]:
    """`count` prompt entries: `warmup` first (rows 0, 1, ...), then each repetition's
    `num_requests` (rows 0 to num_requests - 1, each to leave at its arrival_s), each exactly its row's
    input_length long. Blocks are seeded per repetition and hash id: requests of one repetition share what the
    trace's requests shared, yet no repetition finds the one before it in a prefix cache."""
    try:
        rows = read_trace(load.path)
    except TraceError as e:
        raise PromptError(f"load.path: {e}") from None
    offsets = arrival_offsets(rows, load.speedup)
    out = []
    for i in range(count):
        rep, j = (-1, i % num_requests) if i < warmup else divmod(i - warmup, num_requests)
        row = rows[j]
        blocks = " ".join(_seeded(exact, [seed, rep + 1, h, 0]).filler(load.block_tokens) for h in row.hash_ids)
        room = row.input_length - exact.n_special - 1  # a space and at least one token of the request's own
        if room < 1:
            raise PromptError(f"trace row {j + 1}: input_length {row.input_length} leaves no room after "
                              f"{exact.n_special} special token(s)")
        head = exact.cut(blocks, room) if blocks else ""
        text = _seeded(exact, [seed, rep + 1, i, 1]).padded(head, row.input_length, f"trace row {j + 1}'s prompt")
        out.append(PromptEntry(text=text, token_ids=exact.encode(text), max_tokens=row.output_length,
                               arrival_s=None if i < warmup else offsets[j]))
    return out


def _seeded(exact: Exact, seed: list[int]) -> Exact:
    """The same tokenizer and filler vocabulary, drawing from a generator of this seed: a block's text depends on
    its hash id only, not on the requests built before it."""
    exact.rng = np.random.default_rng(seed)
    return exact
