"""Results as pandas DataFrames, for notebooks, `bench export` and the report's tables: one source for all three.

    to_dataframe(paths)                    one tidy row per cell × metric × statistic, with its 95% CI and its
                                           coefficient of variation across repetitions where the cell has them
    to_dataframe(paths, level="requests")  one row per measured request, with its TTFT, TPOT and E2E latency (from
                                           its offer: queued_ms, a wait for the backend's max_concurrency, inside)

The metrics, their units, their per-request samples and how cell-scope metrics (load time, peak VRAM, ...) are read
all come from the catalogue (harness/results/catalogue.py), as the guide and the report read them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from harness.core.files import atomic_path
from harness.records import STATISTICS
from harness.results.catalogue import CATALOGUE, PER_REQUEST, Statistic
from harness.results.runs import CellView, Run, load_runs

Level = Literal["statistics", "requests"]
LEVELS: tuple[Level, ...] = ("statistics", "requests")
FORMATS = ("csv", "parquet", "jsonl")
IDENTITY = ["run", "results_file", "cell", "model", "backend", "workload", "base_workload", "status", "unstable"]
STATISTIC_COLUMNS = [*IDENTITY, "metric", "statistic", "value", "ci_low", "ci_high", "cv", "unit", "better"]
REQUEST_COLUMNS = ["run", "cell", "model", "backend", "workload", "repetition", "request", "ok", "error", "ttft_ms",
                   "tpot_ms", "e2el_ms", "queued_ms", "input_tokens", "output_tokens", "chunks", "finish_reason",
                   "t_send"]


Row = dict[str, Any]


def _identity(c: CellView) -> Row:
    return {"run": c.run.label, "results_file": str(c.run.path), "cell": c.id, "model": c.model, "backend": c.backend,
            "workload": c.workload, "base_workload": c.base_workload, "status": c.status,
            "unstable": c.cell.unstable, **{f"sweep.{k}": v for k, v in c.sweep.items()}}


def statistic_rows(c: CellView) -> list[Row]:
    rows = []
    ident = _identity(c)
    metrics = c.cell.metrics
    for key, m in CATALOGUE.items():
        common = {"metric": key, "unit": m.unit, "better": m.better}
        if m.scope == "distribution":
            if metrics is None or metrics.distribution(key) is None:
                continue
            names = [Statistic(m, s) for s in ("count", *STATISTICS)]
        elif m.scope == "scalar":
            if metrics is None or key not in metrics.keys():
                continue
            names = [Statistic(m)]
        else:
            names = [Statistic(m)]
        for s in names:
            ci = s.interval(c.cell)
            # A count of samples is a number of requests (or gaps), not a quantity in the metric's unit.
            unit = {"unit": None, "better": None} if s.stat == "count" else {}
            rows.append({**ident, **common, **unit, "statistic": s.stat, "value": s.value(c.cell),
                         "ci_low": ci[0] if ci else None, "ci_high": ci[1] if ci else None,
                         "cv": c.cell.cv.get(s.name)})
    return rows


def request_rows(c: CellView) -> list[Row]:
    ident = {k: v for k, v in _identity(c).items() if k in REQUEST_COLUMNS}
    latencies = {k: PER_REQUEST[k] for k in ("ttft_ms", "tpot_ms", "e2el_ms")}
    return [{**ident, "repetition": r.repetition, "request": r.id, "ok": r.ok, "error": r.error,
             **{k: m.of(r) for k, m in latencies.items()},
             # the wait for a backend's max_concurrency, inside ttft_ms and e2el_ms (which count from the offer)
             "queued_ms": (r.t_send - r.t_queued) * 1e3 if r.t_queued is not None else None,
             "input_tokens": r.input_tokens,
             "output_tokens": r.n_out if r.ok else r.output_tokens, "chunks": len(r.chunk_times),
             "finish_reason": r.finish_reason, "t_send": r.t_send} for r in c.records]


def frame_of(runs: list[Run], level: Literal["statistics", "requests"] = "statistics") -> pd.DataFrame:
    """The frame of runs already loaded (the report builds its tables from it)."""
    if level not in LEVELS:
        raise ValueError(f"level: expected one of {', '.join(LEVELS)}, got {level!r}")
    make: Callable[[CellView], list[Row]] = statistic_rows if level == "statistics" else request_rows
    columns = STATISTIC_COLUMNS if level == "statistics" else REQUEST_COLUMNS
    rows = [row for r in runs for c in r.cells for row in make(c)]
    frame = pd.DataFrame(rows)
    for col in columns:  # the same columns whatever the results hold, even none
        if col not in frame:
            frame[col] = None
    sweeps = sorted(c for c in frame.columns if c.startswith("sweep."))
    return frame[[*columns, *sweeps]]


def to_dataframe(paths: list[Path | str] | Path | str,
                 level: Literal["statistics", "requests"] = "statistics") -> pd.DataFrame:
    """Results folders or results.json files as one DataFrame: `statistics` (tidy, one row per cell, metric and
    statistic) or `requests` (one row per measured request)."""
    return frame_of(load_runs([paths] if isinstance(paths, (str, Path)) else list(paths)), level)


def export(paths: list[Path], out: Path, fmt: str) -> list[Path]:
    """`bench export`: statistics.FMT and requests.FMT in out."""
    if fmt not in FORMATS:
        raise ValueError(f"expected one of {', '.join(FORMATS)}, got {fmt!r}")
    runs = load_runs(list(paths))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for level in LEVELS:
        frame = frame_of(runs, level)
        path = out / f"{level}.{fmt}"
        with atomic_path(path) as tmp:
            if fmt == "csv":
                frame.to_csv(tmp, index=False)
            elif fmt == "parquet":
                frame.to_parquet(tmp, index=False)
            else:
                frame.to_json(tmp, orient="records", lines=True)
        written.append(path)
    return written
