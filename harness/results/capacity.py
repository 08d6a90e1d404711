"""A capacity search's result (`load: {type: capacity}`): per step the rate offered and achieved, the share of
requests that met the slo (with its 95% CI) and the latencies behind it; the capacity is the highest passing step,
stated with the failing step above it, which is the search's uncertainty ("holds 7.5 req/s, fails at 8").

A step passes when at least `attainment` of its requests met the slo, judged as goodput judges it (catalogue.meets_slo:
timed from their arrival, a wait in the harness's queue for a backend's max_concurrency included); a failed request
does not meet it. Requests max_duration_s kept from arriving are not counted: they say the step was short, not that
the engine failed.
"""

from __future__ import annotations

from dataclasses import replace

from harness.config.scenario import SLO, CapacityLoad, ConcurrencyLoad, Load, PoissonLoad
from harness.records import CapacityResult, CapacityStep, CapacityStepResult, MetricValues, RequestRecord
from harness.results.catalogue import SLO_METRICS, Requests, meets_slo, rate


def met_slo(records: list[RequestRecord], slo: SLO) -> int:
    """How many of the records met the slo, timed from their arrival (RequestRecord.t_offered)."""
    return sum(r.ok and meets_slo(r, slo) for r in records)


def step_passes(met: int, requests: int, attainment: float) -> bool:
    return requests > 0 and met >= attainment * requests


def describe_slo(slo: SLO) -> str:
    return " and ".join(f"{SLO_METRICS[k].label} ≤ {v:g} ms" for k, v in slo.model_dump(exclude_none=True).items())


def fmt_load(value: float, search: str) -> str:
    return f"{value:g} req/s" if search == "rate" else f"{value:g} in flight"


def reduce_capacity(records: list[RequestRecord], steps: list[CapacityStep], load: CapacityLoad,
                    slo: SLO) -> CapacityResult:
    from scipy.stats import binomtest  # here: the worker imports this module, and scipy.stats takes seconds

    results = []
    for s in steps:
        mine = [r for r in records if r.repetition == s.step]
        step = Requests(mine, slo)
        ci = binomtest(s.met, s.sent).proportion_ci(0.95, method="wilson") if s.sent else None
        results.append(CapacityStepResult(
            step=s.step, value=s.value, achieved_rate_rps=rate([r.t_send for r in mine]), sent=s.sent,
            not_sent=s.not_sent,
            attainment=s.met / s.sent if s.sent else 0.0,
            attainment_ci=[float(ci.low), float(ci.high)] if ci else None,
            metrics=MetricValues.model_validate({k: m.reduce(step) for k, m in SLO_METRICS.items()}),
            passed=s.passed))
    passing = [s.value for s in results if s.passed]
    capacity = max(passing) if passing else None
    above = [s.value for s in results if not s.passed and (capacity is None or s.value > capacity)]
    fails_at = min(above) if above else None
    return CapacityResult(search=load.search, attainment_target=load.attainment, slo=slo,
                          capacity=capacity, fails_at=fails_at, steps=results,
                          capacity_rps=capacity if load.search == "rate" else _throughput(records, steps, capacity),
                          verdict=verdict(load, slo, capacity, fails_at,
                                          next((s for s in results if s.value == capacity), None)))


def _throughput(records: list[RequestRecord], steps: list[CapacityStep], value: float | None) -> float | None:
    """Completed requests per second of the step that offered `value`, from its first send to its last token."""
    step = next((s.step for s in steps if s.value == value), None)
    done = [r for r in records if r.repetition == step and r.ok]
    if step is None or not done:
        return None
    span = max(r.chunk_times[-1] for r in done) - min(r.t_send for r in done)
    return len(done) / span if span > 0 else None


def verdict(load: CapacityLoad, slo: SLO, capacity: float | None, fails_at: float | None,
            at_capacity: CapacityStepResult | None = None) -> str:
    """In words, with its uncertainty: the bracket, and whether the passing step passed by more than its noise."""
    at = f"{describe_slo(slo)} for {load.attainment:.0%} of requests"
    if capacity is None:
        low = fmt_load(fails_at, load.search) if fails_at is not None else "any step"
        return f"holds no load at the slo ({at}): fails already at {low}"
    bracket = (f", fails at {fmt_load(fails_at, load.search)}" if fails_at is not None
               else ", and no step failed (the search ran out of steps: it may hold more)")
    ci = at_capacity.attainment_ci if at_capacity else None
    margin = (f"; its step's attainment {at_capacity.attainment:.3g} (95% CI {ci[0]:.3g}–{ci[1]:.3g}) passed within "
              f"noise" if at_capacity and ci and ci[0] < load.attainment else "")
    return f"holds {fmt_load(capacity, load.search)} at the slo ({at}){bracket}{margin}"


def operating_point(records: list[RequestRecord], result: CapacityResult,
                    loop_lag_ms: list[list[float]]) -> tuple[list[RequestRecord], list[list[float]], Load]:
    """The step the cell's metrics describe (as its one repetition): the one at the capacity, else the gentlest
    tried; with its loop lags and load. The other steps' numbers are in the result's steps."""
    steps = [s for s in result.steps if s.value == result.capacity] or sorted(result.steps, key=lambda s: s.value)
    step = steps[0].step if steps else 0
    mine = [replace(r, repetition=0) for r in records if r.repetition == step]
    lags = [loop_lag_ms[step]] if step < len(loop_lag_ms) else []
    value = steps[0].value if steps else 1.0
    load = (PoissonLoad(type="poisson", rate=value) if result.search == "rate"
            else ConcurrencyLoad(type="concurrency", concurrency=int(value)))
    return mine, lags, load
