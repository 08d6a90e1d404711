"""The reducer: every metric, for every backend, computed here and nowhere else.

Definitions follow vLLM's serving benchmark (docs/metrics.md); each metric is declared in catalogue.py. Inputs are
per-request records of raw timestamps; outputs are the dicts that go into results.json.
"""

from __future__ import annotations

import warnings
from collections import Counter
from statistics import median
from typing import Any

import numpy as np

from harness.config.scenario import MIN_REPETITIONS, SLO, Load, PoissonLoad
from harness.config.shapes import SteadyState
from harness.records import RequestRecord
from harness.results.catalogue import CATALOGUE, HEADLINE, INCLUDING_CLIENT_QUEUE, STABILITY, headline_label, split_name

PERCENTILE_METHOD = "linear"  # numpy.percentile's method; stored in results so numbers can be reproduced
PERCENTILES = (50, 90, 95, 99)

# When the load generator, not the engine, set the pace (docs/metrics.md, "The client's own numbers"): an open loop
# that sent under this share of the rate it offered, or a dispatch lag or event-loop lag p99 above these.
ACHIEVED_RATE_FLOOR = 0.95
DISPATCH_LAG_P99_LIMIT_MS = 10.0
LOOP_LAG_P99_LIMIT_MS = 5.0
# A latency from the schedule this much above the one from the send at least, and outside its 95% CI, before a verdict
# reads it instead: the event loop's timers fire up to a millisecond late in every client, which is no queue.
CLIENT_QUEUE_NOISE_MS = 1.0


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


def rate(times: list[float]) -> float | None:
    """Events per second over the span from the first to the last of `times`."""
    span = max(times) - min(times) if len(times) > 1 else 0.0
    return (len(times) - 1) / span if span > 0 else None


def client_metrics(records: list[RequestRecord], load: Load | None, loop_lag_ms: list[float] | None) -> dict[str, Any]:
    """The load generator's own numbers for one repetition: the rate asked for (nominal), the rate its schedule
    offered, the rate at which requests really left, how late each left, and how late its event loop ran."""
    open_loop = isinstance(load, PoissonLoad)
    scheduled = [r for r in records if r.t_scheduled is not None]
    return {
        "nominal_rate_rps": load.rate if open_loop else None,
        "offered_rate_rps": rate([r.t_scheduled for r in scheduled]) if open_loop else None,
        "achieved_rate_rps": rate([r.t_send for r in records]),
        "dispatch_lag_ms": stats([(r.t_send - r.t_scheduled) * 1e3 for r in scheduled]),
        "loop_lag_ms": stats(loop_lag_ms or []),
    }


def client_limits(rep: dict[str, Any], capped: bool) -> list[str]:
    """Why a repetition's numbers describe the client more than the engine; [] when the client kept up. Under a
    concurrency cap the harness holds requests back on purpose, so the achieved rate is not the client's doing."""
    reasons = []
    offered, achieved = rep.get("offered_rate_rps"), rep.get("achieved_rate_rps")
    if offered and achieved is not None and not capped and achieved < ACHIEVED_RATE_FLOOR * offered:
        reasons.append(f"achieved rate {achieved:.2f} req/s is {achieved / offered:.0%} of the {offered:.2f} offered "
                       f"(below {ACHIEVED_RATE_FLOOR:.0%})")
    for key, limit, what in (("dispatch_lag_ms", DISPATCH_LAG_P99_LIMIT_MS, "dispatch lag (schedule → send)"),
                             ("loop_lag_ms", LOOP_LAG_P99_LIMIT_MS, "event-loop lag")):
        p99 = (rep.get(key) or {}).get("p99")
        if p99 is not None and p99 > limit:
            reasons.append(f"{what} p99 {p99:.1f} ms exceeds {limit:g} ms")
    return reasons


def reduce_repetition(records: list[RequestRecord], slo, load: Load | None = None,
                      loop_lag_ms: list[float] | None = None, outside_steady_state: int = 0) -> dict[str, Any]:
    """Metrics of one repetition's measured requests (warm-up already excluded; `outside_steady_state` more were
    left out by the workload's steady_state window)."""
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
        "ttft_including_client_queue_ms": stats([r.ttft_including_client_queue * 1e3 for r in done]),
        "e2el_including_client_queue_ms": stats([r.e2el_including_client_queue * 1e3 for r in done]),
        "prefill_tps": stats([r.input_tokens / r.served_ttft for r in done if r.input_tokens and r.served_ttft > 0]),
        "decode_tps": stats([(r.n_out - 1) / (r.e2el - r.ttft) for r in done if r.n_out > 1 and r.e2el > r.ttft]),
        "input_len": stats([r.input_tokens for r in done if r.input_tokens is not None]),
        "output_len": stats([r.n_out for r in done]),
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
        "outside_steady_state": outside_steady_state,
        **client_metrics(records, load, loop_lag_ms),
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


def token_sources(records: list[RequestRecord]) -> dict[str, Any]:
    """Where the token counts came from, and whether every output length was forced exact."""
    return {
        "input": sorted({r.input_source for r in records if r.input_source}),
        "output": sorted({r.output_source for r in records if r.output_source}),
        "exact_output_length": all(r.exact_length for r in records if r.ok) if records else None,
    }


# ---- uncertainty ---------------------------------------------------------------------------------------------------

CONFIDENCE = 0.95
RESAMPLES = 1000
CI_SEED = 0  # fixed: the same records always give the same intervals
ITL_WORK = 20_000_000  # resamples × pooled gaps the ITL bootstrap may touch: fewer resamples for very long outputs
_TAILS = (100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2)


def _interval(replicates: np.ndarray) -> list[float] | None:
    finite = replicates[np.isfinite(replicates)]
    if finite.size < 2:
        return None
    lo, hi = np.percentile(finite, _TAILS)
    return [float(lo), float(hi)]


def _pooled_percentiles(groups: list[np.ndarray], counts: np.ndarray, qs: tuple[int, ...]) -> np.ndarray:
    """Percentiles of the samples of every group pooled, each group repeated counts[b, g] times, for every row b
    of counts: the ITL of resampled requests without materializing them. Returns (len(qs), rows)."""
    owner = np.concatenate([np.full(len(g), i) for i, g in enumerate(groups)])
    values = np.concatenate(groups)
    order = np.argsort(values, kind="stable")
    values, owner = values[order], owner[order]
    out = np.empty((len(qs), counts.shape[0]))
    step = max(1, 4_000_000 // max(values.size, 1))
    for b0 in range(0, counts.shape[0], step):
        cum = np.cumsum(counts[b0:b0 + step][:, owner], axis=1)
        for j, q in enumerate(qs):
            # the inverted CDF: the first sample whose cumulative weight reaches q of the total
            pos = (cum < (q / 100 * cum[:, -1])[:, None]).sum(axis=1)
            out[j, b0:b0 + step] = values[np.minimum(pos, values.size - 1)]
    return out


def bootstrap_repetition(records: list[RequestRecord], rep: dict[str, Any], slo: SLO,
                         rng: np.random.Generator) -> dict[str, np.ndarray]:
    """RESAMPLES replicates of each HEADLINE statistic of one repetition, drawing its completed requests with
    replacement. Throughputs of a resample are its completed work over the busy time its requests took (Σ e2el),
    times the repetition's own Σ e2el / duration (how many requests were in flight on average): at the original
    sample that is exactly work / duration, and it varies as the requests' work and latency do."""
    done = [r for r in records if r.ok]
    n = len(done)
    if n < 2 or not rep.get("duration_s"):
        return {}
    idx = rng.integers(0, n, (RESAMPLES, n))
    out: dict[str, np.ndarray] = {}
    qs = (50, 90, 99)
    for key, values in (("ttft_ms", [r.ttft * 1e3 for r in done]), ("e2el_ms", [r.e2el * 1e3 for r in done]),
                        ("tpot_ms", [r.tpot * 1e3 for r in done if r.tpot is not None]),
                        ("ttft_including_client_queue_ms", [r.ttft_including_client_queue * 1e3 for r in done]),
                        ("e2el_including_client_queue_ms", [r.e2el_including_client_queue * 1e3 for r in done])):
        if len(values) < 2:
            continue
        # One-token outputs have no TPOT: the requests that have one are resampled among themselves.
        draw = idx if len(values) == n else rng.integers(0, len(values), (RESAMPLES, len(values)))
        pct = np.percentile(np.asarray(values)[draw], qs, axis=1, method=PERCENTILE_METHOD)
        out.update({f"{key}.p{q}": pct[j] for j, q in enumerate(qs)})
    gaps = [np.diff(np.asarray(r.chunk_times)) * 1e3 for r in done]
    total_gaps = sum(len(g) for g in gaps)
    if total_gaps:
        rows = max(100, min(RESAMPLES, ITL_WORK // total_gaps))
        counts = np.bincount((idx[:rows] + np.arange(rows)[:, None] * n).ravel(), minlength=rows * n).reshape(rows, n)
        pct = _pooled_percentiles(gaps, counts, qs)
        out.update({f"itl_ms.p{q}": pct[j] for j, q in enumerate(qs)})
    e2el = np.array([r.e2el for r in done])
    in_flight = e2el.sum() / rep["duration_s"]
    busy = e2el[idx].sum(axis=1)
    work = {"request_throughput_rps": np.ones(n), "output_throughput_tok_s": np.array([r.n_out for r in done], float),
            "total_token_throughput_tok_s": np.array([(r.input_tokens or 0) + r.n_out for r in done], float)}
    if rep.get("goodput_rps") is not None:
        work["goodput_rps"] = np.array([meets_slo(r, slo) for r in done], float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out.update({key: x[idx].sum(axis=1) / busy * in_flight for key, x in work.items()})
    return out


def headline_value(rep: dict[str, Any], name: str) -> float | None:
    key, stat = split_name(name)
    v = rep.get(key)
    v = v.get(stat) if stat and isinstance(v, dict) else v
    return float(v) if isinstance(v, (int, float)) else None


def uncertainty(reps: list[dict[str, Any]], replicates: list[dict[str, np.ndarray]],
                rng: np.random.Generator) -> tuple[dict[str, list[float]], str]:
    """The cell's 95% CI of each headline statistic (its median over repetitions), and how it was obtained:
    with >= 3 repetitions, a bootstrap over the repetitions' values, so run-to-run drift is in it; with fewer,
    the requests' bootstrap of each repetition, combined by the same median over repetitions."""
    ci: dict[str, list[float]] = {}
    if len(reps) >= MIN_REPETITIONS:
        for name in HEADLINE:
            values = np.array([v for rep in reps if (v := headline_value(rep, name)) is not None])
            if values.size >= MIN_REPETITIONS:
                medians = np.median(values[rng.integers(0, values.size, (RESAMPLES, values.size))], axis=1)
                if (interval := _interval(medians)) is not None:
                    ci[name] = interval
        return ci, "bootstrap over repetitions"
    for name in HEADLINE:
        per_rep = [r[name] for r in replicates if name in r]
        if per_rep and len(per_rep) == len(reps):
            rows = min(len(x) for x in per_rep)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                combined = np.median(np.stack([x[:rows] for x in per_rep]), axis=0)
            if (interval := _interval(combined)) is not None:
                ci[name] = interval
    return ci, "bootstrap over requests"


def variation(reps: list[dict[str, Any]]) -> dict[str, float]:
    """Coefficient of variation (population std / mean) of each headline statistic across repetitions."""
    cv = {}
    for name in HEADLINE:
        values = [v for rep in reps if (v := headline_value(rep, name)) is not None]
        if len(values) >= 2 and np.mean(values) > 0:
            cv[name] = float(np.std(values) / np.mean(values))
    return cv


def instability(reps: list[dict[str, Any]], cv: dict[str, float], max_cv: float) -> str | None:
    """Why the repetitions disagree beyond max_cv on a typical value (catalogue.STABILITY), or None."""
    parts = []
    for name in STABILITY:
        if cv.get(name, 0.0) > max_cv:
            key, _ = split_name(name)
            values = " / ".join(CATALOGUE[key].format(headline_value(rep, name)) for rep in reps)
            parts.append(f"{headline_label(name)} {values}{' ms' if CATALOGUE[key].unit == 'ms' else ''} "
                         f"(CV {cv[name]:.2f})")
    if not parts:
        return None
    return f"repetitions disagree beyond max_repetition_cv {max_cv:g}: " + "; ".join(parts)


def background_note(resources: dict[str, Any] | None) -> str | None:
    """What else ran on the machine during the cell, from the resource monitor, when it was noticeable."""
    whole = (resources or {}).get("whole") or {}
    other, steal, load = whole.get("other_cpu_percent"), whole.get("steal_percent"), whole.get("load_avg_max")
    if other is None:
        return None
    per_rep = [r.get("other_cpu_percent") for r in (resources or {}).get("repetitions") or []]
    text = f"other processes on the machine used {other:.0f}% of a core on average"
    if any(v is not None for v in per_rep):
        text += " (per repetition: " + ", ".join("?" if v is None else f"{v:.0f}%" for v in per_rep) + ")"
    if load is not None:
        text += f", load average up to {load:.1f}"
    if steal:
        text += f", {steal:.0f}% of a core stolen by the hypervisor"
    return text


def too_many_errors(records: list[RequestRecord], max_error_rate: float) -> str | None:
    """Why the cell fails on its failed requests (all repetitions together), with the first errors, or None."""
    failed = [r for r in records if not r.ok]
    if not records or len(failed) / len(records) <= max_error_rate:
        return None
    reasons = Counter((r.error or "the stream ended without a generated token").strip().splitlines()[0]
                      for r in failed)
    first = "; ".join(f"{reason} ({n}×)" for reason, n in list(reasons.items())[:3])
    return (f"{len(failed)} of {len(records)} requests failed (error rate {len(failed) / len(records):.3g} > "
            f"max_error_rate {max_error_rate:g}); first errors: {first}")


def client_queue_shift(metrics: dict[str, Any], ci: dict[str, list[float]]) -> list[str]:
    """Where a latency from the scheduled send lies outside the 95% CI of the same latency from the actual send (at
    p50 or p99), and CLIENT_QUEUE_NOISE_MS above it: the client's own queue moved it beyond noise, and a verdict
    reads it instead. [] when not."""
    shifts = []
    for key, with_queue in INCLUDING_CLIENT_QUEUE.items():
        for stat in ("p50", "p99"):
            v, sent = (metrics.get(with_queue) or {}).get(stat), (metrics.get(key) or {}).get(stat)
            interval = ci.get(f"{key}.{stat}")
            if (v is not None and sent is not None and interval and v - sent > CLIENT_QUEUE_NOISE_MS
                    and not interval[0] <= v <= interval[1]):
                shifts.append(f"{CATALOGUE[with_queue].label} {stat} {v:.1f} ms is outside the 95% CI of "
                              f"{CATALOGUE[key].label} {stat} from the send [{interval[0]:.1f}, {interval[1]:.1f}] ms")
    return shifts


def in_steady_state(records: list[RequestRecord], window: SteadyState | None) -> list[RequestRecord]:
    """A repetition's requests scheduled inside its steady-state window: from window.skip_start_s after its first
    scheduled send to window.skip_end_s before its last (all of them without a window)."""
    if window is None or not records:
        return records
    due = [r.t_due for r in records]
    start, end = min(due) + window.skip_start_s, max(due) - window.skip_end_s
    return [r for r in records if start <= r.t_due <= end]


def reduce_cell(records: list[RequestRecord], repetitions: int, slo: SLO, max_cv: float, load: Load | None = None,
                loop_lag_ms: list[list[float]] | None = None, capped: bool = False,
                steady_state: SteadyState | None = None) -> dict[str, Any]:
    """A finished cell's numbers: each repetition's metrics and CIs, their medians, the cell's CIs and variation
    across repetitions, whether the repetitions disagree, where the token counts came from, and whether the client
    set the pace (`loop_lag_ms`: per repetition, from the worker; `capped`: a concurrency cap held requests back).
    With a `steady_state` window, each repetition's metrics are those of its requests inside it."""
    rng = np.random.default_rng(CI_SEED)
    every = [[r for r in records if r.repetition == i] for i in range(repetitions)]
    by_rep = [in_steady_state(rs, steady_state) for rs in every]
    lags = loop_lag_ms or []
    reps = [reduce_repetition(rs, slo, load, lags[i] if i < len(lags) else None, len(every[i]) - len(rs))
            for i, rs in enumerate(by_rep)]
    limits = [f"{why}{f' (repetition {i})' if len(reps) > 1 else ''}"
              for i, rep in enumerate(reps) for why in client_limits(rep, capped)]
    replicates = [bootstrap_repetition(rs, rep, slo, rng) for rs, rep in zip(by_rep, reps)]
    metrics = median_over_repetitions(reps)
    cv = variation(reps)
    ci, method = uncertainty(reps, replicates, rng)
    for rep, reps_replicates in zip(reps, replicates):
        rep["ci"] = {name: interval for name, x in reps_replicates.items() if (interval := _interval(x)) is not None}
    return {"metrics": {**metrics, "ttft_p99_cv": cv.get("ttft_ms.p99")}, "repetitions": reps, "ci": ci,
            "ci_method": method, "cv": cv, "unstable": instability(reps, cv, max_cv),
            "percentile_method": PERCENTILE_METHOD, "token_counts": token_sources(records),
            "client_limited": bool(limits), "client_limited_reasons": limits,
            "client_queue_shift": client_queue_shift(metrics, ci)}
