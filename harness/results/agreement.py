"""Did the engines answer alike? With `record_outputs: true`, the cells of one model and workload decoding greedily
(temperature 0) on two or more backends got the same prompts (the prompts file is shared by the backends): each
request's first FIRST_N tokens are compared with the reference backend's (the first in the scenario's order), or its
first words where either side has no token ids. Different precisions (float32 against float16) legitimately
diverge, so each row says which precisions it compares, or that they are unknown."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from scipy.stats import binomtest

from harness.config.scenario import Workload
from harness.records import Agreement, CellResult, RequestRecord, RunResult, read_requests

FIRST_N = 32
Outputs = dict[tuple[int, int], RequestRecord]  # a cell's answered requests by (repetition, request id)
Unit = Literal["tokens", "words"]

# The names engines give one precision, as they write them into their environment.
_PRECISIONS = {"f32": "float32", "fp32": "float32", "f16": "float16", "fp16": "float16", "half": "float16",
               "bf16": "bfloat16"}


def precision(cell: CellResult) -> str | None:
    """The precision the engine computed in, where its environment says."""
    for value in (cell.engine.compute_dtype, cell.engine.dtype, cell.engine.gguf_file_type):
        if value:
            name = value.lower().removeprefix("torch.")
            return _PRECISIONS.get(name, name)
    return None


def _outputs(run_dir: Path, cell: CellResult) -> Outputs:
    try:
        records = read_requests(cell.requests_path(run_dir))
    except FileNotFoundError:
        return {}
    return {(r.repetition, r.id): r for r in records
            if r.ok and r.repetition >= 0 and (r.output_token_ids or r.output_text)}


def _common(a: Sequence[object], b: Sequence[object]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare(reference: Outputs, other: Outputs, first_n: int = FIRST_N) -> tuple[Unit, int, int, float] | None:
    """(unit, compared, matching, mean common prefix) over the requests both answered; None when none."""
    keys = sorted(reference.keys() & other.keys())
    if not keys:
        return None
    by_ids = all(reference[k].output_token_ids and other[k].output_token_ids for k in keys)
    matching, prefixes = 0, []
    for k in keys:
        a: Sequence[object]
        b: Sequence[object]
        if by_ids:
            a, b = (reference[k].output_token_ids or [])[:first_n], (other[k].output_token_ids or [])[:first_n]
        else:
            a, b = (reference[k].output_text or "").split()[:first_n], (other[k].output_text or "").split()[:first_n]
        common = _common(a, b)
        # A request agrees when its first N match, or all of a shorter answer matches the same shorter answer.
        matching += common == len(a) == len(b)
        prefixes.append(common)
    return ("tokens" if by_ids else "words"), len(keys), matching, sum(prefixes) / len(prefixes)


def agreement(run: RunResult, run_dir: Path, first_n: int = FIRST_N) -> list[Agreement]:
    if not run.scenario.get("record_outputs"):
        return []
    groups: dict[tuple[str, str], list[CellResult]] = defaultdict(list)
    for c in run.cells:
        spec = c.workload_spec  # None: results that stored no workload, taken as greedy (the default)
        if c.ok and (spec.temperature == 0 if isinstance(spec, Workload) else spec is None):
            groups[(c.model, c.workload)].append(c)
    rows = []
    for (model, workload), cells in groups.items():
        if len(cells) < 2:
            continue
        ref_cell, *others = cells
        reference = _outputs(run_dir, ref_cell)
        for cell in others:
            result = compare(reference, _outputs(run_dir, cell), first_n)
            if result is None:
                continue
            unit, compared, matching, prefix = result
            a, b = precision(ref_cell), precision(cell)
            label = "unknown" if a is None or b is None else a if a == b else f"{a} vs {b}"
            ci = binomtest(matching, compared).proportion_ci(0.95)
            rows.append(Agreement(model=model, workload=workload, reference=ref_cell.backend, backend=cell.backend,
                                  unit=unit, first_n=first_n, compared=compared, matching=matching,
                                  share=matching / compared, ci=[ci.low, ci.high], mean_common_prefix=prefix,
                                  precision=label))
    return rows
