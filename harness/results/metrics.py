"""The reducer: every metric of the catalogue (catalogue.py, where each is declared with its extractor and its
reduction), for every backend, computed here and nowhere else: per repetition, their medians, 95% CIs, the variation
across repetitions and whether it makes the cell unstable.

Definitions follow vLLM's serving benchmark (docs/metrics.md). Inputs are per-request records of raw timestamps;
outputs are the typed blocks of a CellResult (harness/records.py).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from statistics import median
from typing_extensions import TypedDict  # pydantic reads it (TypeAdapter) on Python < 3.12

import numpy as np

from harness.config.scenario import MIN_REPETITIONS, SLO, Load
from harness.config.shapes import SteadyState
from harness.records import (PERCENTILE_METHOD, Distribution, MetricValue, MetricValues, Repetition, RequestRecord,
                             ResourceUsage, TokenCounts)
from harness.results.catalogue import (CATALOGUE, HEADLINE, INCLUDING_CLIENT_QUEUE, REDUCED, STABILITY, RequestMetric,
                                       Requests, headline_label, itl_gaps, meets_slo, split_name)

# When the load generator, not the engine, set the pace (docs/metrics.md, "The client's own numbers"): an open loop
# that sent under this share of the rate it offered, or a dispatch lag or event-loop lag p99 above these.
ACHIEVED_RATE_FLOOR = 0.95
DISPATCH_LAG_P99_LIMIT_MS = 10.0
LOOP_LAG_P99_LIMIT_MS = 5.0
# A latency from the schedule this much above the one from the send at least, and outside its 95% CI, before a verdict
# reads it instead: the event loop's timers fire up to a millisecond late in every client, which is no queue.
CLIENT_QUEUE_NOISE_MS = 1.0


class CellMetrics(TypedDict):
    """What the reducer gives a finished cell: these are CellResult's fields of the same names."""
    metrics: MetricValues
    repetitions: list[Repetition]
    ci: dict[str, list[float]]
    ci_method: str
    cv: dict[str, float]
    unstable: str | None
    percentile_method: str
    token_counts: TokenCounts
    client_limited: bool
    client_limited_reasons: list[str]
    client_queue_shift: list[str]


def client_limits(rep: MetricValues, capped: bool) -> list[str]:
    """Why a repetition's numbers describe the client more than the engine; [] when the client kept up. Under a
    concurrency cap the harness holds requests back on purpose, so the achieved rate is not the client's doing."""
    reasons = []
    offered, achieved = rep.value("offered_rate_rps"), rep.value("achieved_rate_rps")
    if offered and achieved is not None and not capped and achieved < ACHIEVED_RATE_FLOOR * offered:
        reasons.append(f"achieved rate {achieved:.2f} req/s is {achieved / offered:.0%} of the {offered:.2f} offered "
                       f"(below {ACHIEVED_RATE_FLOOR:.0%})")
    for key, limit in (("dispatch_lag_ms", DISPATCH_LAG_P99_LIMIT_MS), ("loop_lag_ms", LOOP_LAG_P99_LIMIT_MS)):
        p99 = rep.value(f"{key}.p99")
        if p99 is not None and p99 > limit:
            reasons.append(f"{CATALOGUE[key].label} p99 {p99:.1f} ms exceeds {limit:g} ms")
    return reasons


def reduce_repetition(records: list[RequestRecord], slo: SLO, load: Load | None = None,
                      loop_lag_ms: list[float] | None = None, outside_steady_state: int = 0) -> Repetition:
    """Every metric of the catalogue for one repetition's measured requests (warm-up already excluded;
    `outside_steady_state` more were left out by the workload's steady_state window)."""
    reqs = Requests(records, slo, load, loop_lag_ms or [], outside_steady_state)
    return Repetition.model_validate({m.key: m.reduce(reqs) for m in REDUCED})


def median_over_repetitions(reps: Sequence[MetricValues]) -> MetricValues:
    """The cell's headline numbers: for every scalar and every statistic, the median over repetitions."""
    def med(values: list[MetricValue]) -> float | int | None:
        present = [v for v in values if isinstance(v, (int, float))]
        return median(present) if present else None

    out: dict[str, MetricValue] = {}
    for key in reps[0].keys():
        if reps[0].distribution(key) is not None:
            out[key] = Distribution.model_validate(
                {s: med([getattr(r.distribution(key), s, None) for r in reps]) for s in Distribution.model_fields})
        else:
            out[key] = med([r.raw(key) for r in reps])
    return MetricValues.model_validate(out)


def token_sources(records: list[RequestRecord]) -> TokenCounts:
    """Where the token counts came from, and whether every output length was forced exact."""
    return TokenCounts(input=sorted({r.input_source for r in records if r.input_source}),
                       output=sorted({r.output_source for r in records if r.output_source}),
                       exact_output_length=all(r.exact_length for r in records if r.ok) if records else None)


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


def bootstrap_repetition(records: list[RequestRecord], rep: MetricValues, slo: SLO,
                         rng: np.random.Generator) -> dict[str, np.ndarray]:
    """RESAMPLES replicates of each HEADLINE statistic of one repetition, drawing its completed requests with
    replacement. Throughputs of a resample are its completed work over the busy time its requests took (Σ e2el),
    times the repetition's own Σ e2el / duration (how many requests were in flight on average): at the original
    sample that is exactly work / duration, and it varies as the requests' work and latency do."""
    done = [r for r in records if r.ok]
    n = len(done)
    duration = rep.value("duration_s")
    if n < 2 or not duration:
        return {}
    idx = rng.integers(0, n, (RESAMPLES, n))
    out: dict[str, np.ndarray] = {}
    qs = (50, 90, 99)
    for key, m in CATALOGUE.items():
        if not isinstance(m, RequestMetric) or f"{key}.p50" not in HEADLINE:
            continue
        values = m.samples(done)
        if len(values) < 2:
            continue
        # One-token outputs have no TPOT: the requests that have one are resampled among themselves.
        draw = idx if len(values) == n else rng.integers(0, len(values), (RESAMPLES, len(values)))
        pct = np.percentile(np.asarray(values)[draw], qs, axis=1, method=PERCENTILE_METHOD)
        out.update({f"{key}.p{q}": pct[j] for j, q in enumerate(qs)})
    gaps = [np.asarray(itl_gaps(r)) for r in done]
    total_gaps = sum(len(g) for g in gaps)
    if total_gaps:
        rows = max(100, min(RESAMPLES, ITL_WORK // total_gaps))
        counts = np.bincount((idx[:rows] + np.arange(rows)[:, None] * n).ravel(), minlength=rows * n).reshape(rows, n)
        pct = _pooled_percentiles(gaps, counts, qs)
        out.update({f"itl_ms.p{q}": pct[j] for j, q in enumerate(qs)})
    e2el = np.array([r.e2el for r in done])
    in_flight = e2el.sum() / duration
    busy = e2el[idx].sum(axis=1)
    work = {"request_throughput_rps": np.ones(n), "output_throughput_tok_s": np.array([r.n_out for r in done], float),
            "total_token_throughput_tok_s": np.array([(r.input_tokens or 0) + r.n_out for r in done], float)}
    if rep.value("goodput_rps") is not None:
        work["goodput_rps"] = np.array([meets_slo(r, slo) for r in done], float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out.update({key: x[idx].sum(axis=1) / busy * in_flight for key, x in work.items()})
    return out


def uncertainty(reps: list[Repetition], replicates: list[dict[str, np.ndarray]],
                rng: np.random.Generator) -> tuple[dict[str, list[float]], str]:
    """The cell's 95% CI of each headline statistic (its median over repetitions), and how it was obtained:
    with >= 3 repetitions, a bootstrap over the repetitions' values, so run-to-run drift is in it; with fewer,
    the requests' bootstrap of each repetition, combined by the same median over repetitions."""
    ci: dict[str, list[float]] = {}
    if len(reps) >= MIN_REPETITIONS:
        for name in HEADLINE:
            values = np.array([v for rep in reps if (v := rep.value(name)) is not None])
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


def variation(reps: list[Repetition]) -> dict[str, float]:
    """Coefficient of variation (population std / mean) of each headline statistic across repetitions."""
    cv = {}
    for name in HEADLINE:
        values = [v for rep in reps if (v := rep.value(name)) is not None]
        if len(values) >= 2 and np.mean(values) > 0:
            cv[name] = float(np.std(values) / np.mean(values))
    return cv


def instability(reps: list[Repetition], cv: dict[str, float], max_cv: float) -> str | None:
    """Why the repetitions disagree beyond max_cv on a typical value (catalogue.STABILITY), or None."""
    parts = []
    for name in STABILITY:
        if cv.get(name, 0.0) > max_cv:
            m = CATALOGUE[split_name(name)[0]]
            values = " / ".join(m.format(rep.value(name)) for rep in reps)
            parts.append(f"{headline_label(name)} {values}{' ms' if m.unit == 'ms' else ''} (CV {cv[name]:.2f})")
    if not parts:
        return None
    return f"repetitions disagree beyond max_repetition_cv {max_cv:g}: " + "; ".join(parts)


def background_note(resources: ResourceUsage | None) -> str | None:
    """What else ran on the machine during the cell, from the resource monitor, when it was noticeable."""
    whole = resources.whole if resources else None
    if whole is None or whole.other_cpu_percent is None:
        return None
    text = f"other processes on the machine used {whole.other_cpu_percent:.0f}% of a core on average"
    per_rep = [r.other_cpu_percent for r in resources.repetitions] if resources else []
    if any(v is not None for v in per_rep):
        text += " (per repetition: " + ", ".join("?" if v is None else f"{v:.0f}%" for v in per_rep) + ")"
    if whole.load_avg_max is not None:
        text += f", load average up to {whole.load_avg_max:.1f}"
    if whole.steal_percent:
        text += f", {whole.steal_percent:.0f}% of a core stolen by the hypervisor"
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


def client_queue_shift(metrics: MetricValues, ci: dict[str, list[float]]) -> list[str]:
    """Where a latency from the scheduled send lies outside the 95% CI of the same latency from the actual send (at
    p50 or p99), and CLIENT_QUEUE_NOISE_MS above it: the client's own queue moved it beyond noise, and a verdict
    reads it instead. [] when not."""
    shifts = []
    for key, with_queue in INCLUDING_CLIENT_QUEUE.items():
        for stat in ("p50", "p99"):
            v, sent = metrics.value(f"{with_queue}.{stat}"), metrics.value(f"{key}.{stat}")
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
                steady_state: SteadyState | None = None) -> CellMetrics:
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
        rep.ci = {name: interval for name, x in reps_replicates.items() if (interval := _interval(x)) is not None}
    # ttft_p99_cv: the spread of the tail across repetitions, kept beside the medians for the guide (a cell metric).
    metrics = MetricValues.model_validate({**(metrics.model_extra or {}), "ttft_p99_cv": cv.get("ttft_ms.p99")})
    return CellMetrics(metrics=metrics, repetitions=reps, ci=ci, ci_method=method, cv=cv,
                       unstable=instability(reps, cv, max_cv), percentile_method=PERCENTILE_METHOD,
                       token_counts=token_sources(records), client_limited=bool(limits),
                       client_limited_reasons=limits, client_queue_shift=client_queue_shift(metrics, ci))
