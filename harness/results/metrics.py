"""The reducer: every metric, for every backend, computed here and nowhere else.

Definitions follow vLLM's serving benchmark (docs/metrics.md); each metric is declared in catalogue.py. Inputs are
per-request records of raw timestamps; outputs are the dicts that go into results.json.
"""

from __future__ import annotations

from statistics import median
from typing import Any

import numpy as np

from harness.config.scenario import SLO
from harness.records import RequestRecord

PERCENTILE_METHOD = "linear"  # numpy.percentile's method; stored in results so numbers can be reproduced
PERCENTILES = (50, 90, 95, 99)


def stats(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "mean": None, "std": None, "min": None, **{f"p{p}": None for p in PERCENTILES}, "max": None}
    a = np.asarray(values, dtype=float)
    pct = np.percentile(a, PERCENTILES, method=PERCENTILE_METHOD)
    return {"count": int(a.size), "mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
            **{f"p{p}": float(v) for p, v in zip(PERCENTILES, pct)}, "max": float(a.max())}


def meets_slo(r: RequestRecord, slo) -> bool:
    tpot = r.tpot
    return ((slo.ttft_ms is None or r.ttft * 1e3 <= slo.ttft_ms)
            and (slo.tpot_ms is None or tpot is None or tpot * 1e3 <= slo.tpot_ms)
            and (slo.e2el_ms is None or r.e2el * 1e3 <= slo.e2el_ms))


def reduce_repetition(records: list[RequestRecord], slo) -> dict[str, Any]:
    """Metrics of one repetition's measured requests (warm-up already excluded)."""
    done = [r for r in records if r.ok]
    n_errors = len(records) - len(done)
    itl = [(b - a) * 1e3 for r in done for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    start = min((r.t_send for r in records), default=0.0)
    end = max((r.chunk_times[-1] for r in done), default=start)
    duration = end - start
    n_in = sum(r.input_tokens or 0 for r in done)
    n_out = sum(r.n_out for r in done)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: None)
    has_slo = any(v is not None for v in (slo.ttft_ms, slo.tpot_ms, slo.e2el_ms))
    return {
        "ttft_ms": stats([r.ttft * 1e3 for r in done]),
        "tpot_ms": stats([r.tpot * 1e3 for r in done if r.tpot is not None]),
        "itl_ms": stats(itl),
        "e2el_ms": stats([r.e2el * 1e3 for r in done]),
        "prefill_tps": stats([r.input_tokens / r.ttft for r in done if r.input_tokens and r.ttft > 0]),
        "decode_tps": stats([(r.n_out - 1) / (r.e2el - r.ttft) for r in done if r.n_out > 1 and r.e2el > r.ttft]),
        "duration_s": duration,
        "completed": len(done),
        "errors": n_errors,
        "error_rate": n_errors / len(records) if records else 0.0,
        "total_input_tokens": n_in,
        "total_output_tokens": n_out,
        "request_throughput_rps": per_s(len(done)),
        "output_throughput_tok_s": per_s(n_out),
        "total_token_throughput_tok_s": per_s(n_in + n_out),
        "goodput_rps": per_s(sum(meets_slo(r, slo) for r in done)) if has_slo else None,
    }


def median_over_repetitions(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """The cell's headline numbers: for every scalar and every statistic, the median over repetitions."""
    def med(values):
        values = [v for v in values if v is not None]
        return median(values) if values else None

    out: dict[str, Any] = {}
    for key, first in reps[0].items():
        if isinstance(first, dict):
            out[key] = {k: med([r[key][k] for r in reps]) for k in first}
        else:
            out[key] = med([r[key] for r in reps])
    return out


def spread_over_repetitions(reps: list[dict[str, Any]], key: str, stat: str) -> float | None:
    """Coefficient of variation of one statistic across repetitions (e.g. TTFT p99): run-to-run stability."""
    s = stats([r[key][stat] for r in reps if r[key][stat] is not None])
    return s["std"] / s["mean"] if s["count"] >= 2 and s["mean"] else None


def token_sources(records: list[RequestRecord]) -> dict[str, Any]:
    """Where the token counts came from, and whether every output length was forced exact."""
    return {
        "input": sorted({r.input_source for r in records if r.input_source}),
        "output": sorted({r.output_source for r in records if r.output_source}),
        "exact_output_length": all(r.exact_length for r in records if r.ok) if records else None,
    }


def reduce_cell(records: list[RequestRecord], repetitions: int, slo: SLO) -> dict[str, Any]:
    """A finished cell's numbers: each repetition's metrics, their medians, and where the token counts came from."""
    reps = [reduce_repetition([r for r in records if r.repetition == i], slo) for i in range(repetitions)]
    return {"metrics": {**median_over_repetitions(reps), "ttft_p99_cv": spread_over_repetitions(reps, "ttft_ms", "p99")},
            "repetitions": reps, "percentile_method": PERCENTILE_METHOD, "token_counts": token_sources(records)}
