"""The load shapes peers offer: bursty (gamma) arrivals, a ramp-up to the rate, an over-saturation stop and a
steady-state window; each through the schema, the load generator or the reducer, and the report."""

import json
import math

import numpy as np
import pytest

from harness.config.scenario import SLO, PoissonLoad
from harness.config.shapes import OversaturationStop, RampUp, SteadyState
from harness.records import RequestRecord
from harness.results.metrics import reduce_cell
from harness.run.saturation import SaturationWatch
from harness.run.strategies import poisson_offsets
from tests.conftest import scenario_dict
from tests.config.test_scenario_errors import expect_error

HF = {"name": "hf", "kind": "transformers"}


def cv_of_gaps(offsets: list[float]) -> float:
    gaps = np.diff(offsets)
    return float(gaps.std() / gaps.mean())


@pytest.mark.parametrize("burstiness, cv", [(0.25, 2.0), (1.0, 1.0), (4.0, 0.5)])
def test_burstiness_shapes_the_gaps_and_keeps_the_rate(burstiness, cv):
    """Gamma gaps of shape b have a coefficient of variation of 1/sqrt(b), whatever the rate (vLLM's --burstiness)."""
    offsets = poisson_offsets(4000, 20.0, 5, burstiness)
    assert cv_of_gaps(offsets) == pytest.approx(cv, rel=0.1)
    assert 3999 / offsets[-1] == pytest.approx(20.0, rel=1e-9)  # the schedule offers exactly the rate


def test_burstiness_one_sends_the_poisson_schedule_a_seed_always_sent():
    assert poisson_offsets(300, 7.0, 2, 1.0) == poisson_offsets(300, 7.0, 2)
    assert poisson_offsets(300, 7.0, 2, 1.01) != poisson_offsets(300, 7.0, 2)


@pytest.mark.parametrize("strategy", ["linear", "exponential"])
def test_a_ramp_up_climbs_to_the_rate_then_holds(strategy):
    """From 10 req/s to 100 over 2 s: the arrivals by time t follow the cumulative rate, the last leaves when the
    ramp's arrivals and the rest at 100 req/s add up to n - 1."""
    ramp = RampUp(strategy=strategy, start_rate=10, duration_s=2)
    if strategy == "linear":
        cumulative = lambda t: 10 * t + 22.5 * t * t  # noqa: E731
    else:
        k = math.log(10) / 2
        cumulative = lambda t: 10 * math.expm1(k * t) / k  # noqa: E731
    offsets = poisson_offsets(1000, 100.0, 4, ramp_up=ramp)
    assert offsets[-1] == pytest.approx(2 + (999 - cumulative(2)) / 100, rel=1e-9)
    for t in (0.5, 1.0, 1.5, 2.0, 4.0):
        expected = cumulative(min(t, 2)) + 100 * max(0.0, t - 2)
        assert sum(o <= t for o in offsets) == pytest.approx(expected, abs=4 * math.sqrt(expected) + 2)
    # the first second offers far less than the rate, the last far more than the first
    assert sum(o <= 1 for o in offsets) < 0.5 * 100


def test_an_over_saturated_engine_is_told_from_a_slow_one():
    """Requests in flight and TTFT both rising: over-saturated. A stable engine, however slow, is not."""
    rule = OversaturationStop(min_s=1, min_growth=2, alpha=0.01)
    rng = np.random.default_rng(0)

    def watch(flight, ttft) -> SaturationWatch:
        w = SaturationWatch(rule)
        w.flight = [(t, flight(t) + rng.normal(0, 0.5)) for t in np.arange(0.25, 6, 0.25)]
        w.ttft = [(t, ttft(t) * rng.lognormal(0, 0.1)) for t in np.arange(0.0, 6, 0.05)]
        return w

    growing = watch(lambda t: 4 * t, lambda t: 0.05 + 0.2 * t).judge(6.0)
    assert growing.startswith("over-saturated after 6.0 s: requests in flight rose") and " and TTFT rose " in growing
    assert watch(lambda t: 12.0, lambda t: 1.5).judge(6.0) is None  # slow but stable
    assert watch(lambda t: 4 * t, lambda t: 0.05).judge(6.0) is None  # more in flight, but served as fast
    assert watch(lambda t: 3.0, lambda t: 0.05 + 0.2 * t).judge(6.0) is None  # slower, but no queue


@pytest.mark.slow
def test_an_over_saturation_stop_ends_the_repetition_and_says_so(tiny_model, write_scenario, tmp_path):
    """An engine serving one request at a time (~30 req/s at most) offered 60 req/s: its queue grows, the load
    stops within seconds instead of sending all 300 requests, and results and report say why."""
    from harness.config.load import load_scenario
    from harness.run.runner import Runner

    b = {"name": "one-slot", "kind": "scripted", "options": {"ttft_s": 0.02, "itl_s": 0.004, "slots": 1}}
    wl = [{"name": "w", "input_tokens": 8, "output_tokens": 4, "num_requests": 300, "warmup_requests": 0,
           "load": {"type": "poisson", "rate": 60, "oversaturation_stop": {"min_s": 1.0}}}]
    path = write_scenario(scenario_dict(tiny_model, [b], wl))
    assert Runner(load_scenario(path), str(path), tmp_path / "out", in_process=True).run() == 0
    (cell,) = json.loads((tmp_path / "out" / "results.json").read_text())["cells"]
    (why,) = cell["oversaturation"]
    assert why.startswith("repetition 0: over-saturated after ") and "requests in flight rose" in why
    assert cell["not_sent"][0] > 100 and cell["metrics"]["completed"] == 300 - cell["not_sent"][0]
    assert "one-slot stopped early, repetition 0: over-saturated" in (tmp_path / "out" / "report.md").read_text()


def record(i: int, t: float, ttft: float) -> RequestRecord:
    return RequestRecord(id=i, repetition=0, t_send=t, t_scheduled=t, chunk_times=[t + ttft, t + ttft + 0.01],
                         output_tokens=2)


def test_a_steady_state_window_leaves_the_ramp_up_and_the_drain_out():
    """10 s of requests, slow in the first 2 s (a cold engine ramping up) and the last 1 s (a drain): measured over
    the window, TTFT is the steady one, and the requests left out are counted."""
    records = [record(i, i * 0.1, 0.5 if i < 20 or i >= 90 else 0.05) for i in range(100)]
    whole = reduce_cell(records, 1, SLO(), 1.0)
    window = reduce_cell(records, 1, SLO(), 1.0, steady_state=SteadyState(skip_start_s=2.0, skip_end_s=0.95))
    assert whole["metrics"].value("ttft_ms.p90") == pytest.approx(500)
    assert window["metrics"].value("ttft_ms.max") == pytest.approx(50)
    assert window["metrics"].value("completed") == 70 and window["metrics"].value("outside_steady_state") == 30
    assert whole["metrics"].value("outside_steady_state") == 0


@pytest.mark.parametrize("load, steady, needle", [
    ({"type": "poisson", "rate": 1, "burstiness": 0}, None, "workloads[0].load.burstiness"),
    ({"type": "poisson", "rate": 1, "ramp_up": {"strategy": "cubic", "start_rate": 1, "duration_s": 1}}, None,
     "workloads[0].load.ramp_up.strategy"),
    ({"type": "poisson", "rate": 1, "clients": 2, "oversaturation_stop": {}}, None,
     "oversaturation_stop is decided by one load generator"),
    ({"type": "poisson", "rate": 1, "oversaturation_stop": {"min_growth": 1}}, None,
     "workloads[0].load.oversaturation_stop.min_growth"),
    ({"type": "sequential"}, {}, "give skip_start_s or skip_end_s"),
    ({"type": "sequential"}, {"skip_start_s": -1}, "workloads[0].steady_state.skip_start_s"),
])
def test_bad_load_shapes_are_refused_naming_the_field(write_scenario, tiny_model, load, steady, needle):
    wl = {"name": "w", "input_tokens": 8, "output_tokens": 4, "num_requests": 1, "load": load}
    if steady is not None:
        wl["steady_state"] = steady
    expect_error(write_scenario(scenario_dict(tiny_model, [HF], [wl])), needle)


def test_the_report_describes_each_shape():
    from harness.analyze.report import describe_workload

    text = describe_workload({
        "name": "w", "input_tokens": 8, "output_tokens": 4, "num_requests": 10,
        "load": {"type": "poisson", "rate": 5, "burstiness": 0.5,
                 "ramp_up": {"strategy": "exponential", "start_rate": 1, "duration_s": 30},
                 "oversaturation_stop": {"min_s": 5}},
        "steady_state": {"skip_start_s": 30, "skip_end_s": 5}})
    assert ("gamma arrivals (burstiness 0.5) at 5 req/s, ramped up exponentially from 1 req/s over 30 s, stopped "
            "once over-saturated (after 5 s at the earliest)") in text
    assert "requests scheduled in the first 30 s and the last 5 s of each repetition left out" in text
    assert PoissonLoad(type="poisson", rate=1).burstiness == 1.0
