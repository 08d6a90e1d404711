"""The capacity search (`load: {type: capacity}`): the steps it chooses, and end to end against the scripted backend
with batch slots, whose latency rises once the load needs more slots than it has (a known knee)."""

import heapq
import json
import math
import subprocess
import sys

import pytest

from harness.config.scenario import SLO, CapacityLoad
from harness.core.errors import BackendError
from harness.records import SCHEMA_VERSION, CapacityStep, RequestRecord, ResultsError, load_run
from harness.results.capacity import met_slo, reduce_capacity
from harness.run.capacity import CapacitySearch
from harness.run.strategies import poisson_offsets
from tests.conftest import ROOT, run_scenario, scenario_dict


def search(load: CapacityLoad, knee: float) -> CapacitySearch:
    s = CapacitySearch(load)
    while (value := s.next()) is not None:
        s.record(value, value <= knee)
    return s


@pytest.mark.parametrize("knee", [0.6, 1.0, 3.3, 7.7, 41.0, 250.0])
def test_a_rate_search_brackets_the_knee_to_the_tolerance(knee):
    load = CapacityLoad(type="capacity", start=2.0, tolerance=0.25, max_steps=30)
    s = search(load, knee)
    assert s.passed <= knee < s.failed and s.failed - s.passed <= 0.25
    values = [v for v, _ in s.tried]
    assert len(values) == len(set(values))  # no value is measured twice
    assert len(values) <= 2 * math.log2(max(knee, 2.0) / 0.25) + 3  # bracketing then bisection: logarithmic


@pytest.mark.parametrize("knee", [1, 2, 5, 13])
def test_a_concurrency_search_finds_the_knee_exactly(knee):
    s = search(CapacityLoad(type="capacity", search="concurrency", max_steps=30), knee)
    assert (s.passed, s.failed) == (knee, knee + 1)


def test_a_search_reports_what_it_knows_when_steps_run_out_or_nothing_passes():
    s = search(CapacityLoad(type="capacity", start=1.0, max_steps=3), 100.0)
    assert (s.passed, s.failed) == (4.0, None) and len(s.tried) == 3
    s = search(CapacityLoad(type="capacity", start=4.0, tolerance=0.5, max_steps=10), 0.1)
    assert s.passed is None and [v for v, _ in s.tried] == [4.0, 2.0, 1.0, 0.5]


async def test_a_capacity_load_drives_its_steps_from_their_outcomes():
    """The strategy chooses each step from the outcomes before it: every step is a run of its own (Poisson at the
    step's rate), judged by the slo, and recorded with what it sent; only the first step must have an answer."""
    from harness.run.strategies import CapacityStrategy, PoissonStrategy, RunOutcome, strategy_for

    load = CapacityLoad(type="capacity", start=2.0, tolerance=0.5, attainment=0.9, max_steps=30)
    knee, runs = 5.0, []

    async def run(index, strategy, may_all_fail):
        runs.append((index, strategy, may_all_fail))
        fast = strategy.rate <= knee  # the engine meets the 50 ms TTFT up to the knee
        records = [RequestRecord(id=i, repetition=index, t_send=float(index), chunk_times=[index + (0.01 if fast
                                 else 0.2)], output_tokens=1) for i in range(10)]
        return RunOutcome(records, not_sent=index % 2, start=float(index), end=index + 1.0)

    strategy = strategy_for(load, SLO(ttft_ms=50))
    assert isinstance(strategy, CapacityStrategy) and strategy.runs(repetitions=3) == 30
    steps = await strategy.drive(run, 3, None, "scripted")
    assert [s.value for s in steps] == [v for v, _ in search(load, knee).tried]  # the search's own choices
    assert [s.passed for s in steps] == [s.value <= knee for s in steps]
    assert [(s.step, s.sent, s.met, s.not_sent) for s in steps] == [
        (i, 10, 10 if s.passed else 0, i % 2) for i, s in enumerate(steps)]
    assert all(isinstance(st, PoissonStrategy) and st.rate == s.value for (_, st, _), s in zip(runs, steps))
    assert [may for _, _, may in runs] == [False] + [True] * (len(runs) - 1)

    concurrency = strategy_for(load.model_copy(update={"search": "concurrency"}), SLO(ttft_ms=50))
    with pytest.raises(BackendError, match="load.search: concurrency needs an engine that serves requests at once; "
                                           "tgi serves 1 at a time: search the rate instead"):
        await concurrency.drive(run, 3, 1, "tgi")


def test_the_result_states_the_bracket_and_each_steps_attainment_with_its_interval():
    load = CapacityLoad(type="capacity", search="rate", attainment=0.9)
    slo = SLO(ttft_ms=50)

    def recs(step, n, slow):
        return [RequestRecord(id=step * 100 + i, repetition=step, t_send=step * 10 + i * 0.1,
                              chunk_times=[step * 10 + i * 0.1 + (0.2 if i < slow else 0.01)], output_tokens=1)
                for i in range(n)]

    records = recs(0, 20, 0) + recs(1, 20, 10) + recs(2, 20, 1)
    steps = [CapacityStep(step=0, value=2, start=0, end=2, sent=20, met=20, passed=True),
             CapacityStep(step=1, value=4, start=10, end=12, sent=20, met=10, passed=False),
             CapacityStep(step=2, value=3, start=20, end=22, sent=18, not_sent=2, met=17, passed=False)]
    result = reduce_capacity(records, steps, load, slo)
    assert (result.capacity, result.fails_at, result.capacity_rps) == (2, 3, 2)
    # 20 of 20 met it: the 95% CI of the share (0.84-1) reaches below the 0.9 target, and the verdict says so
    assert result.verdict == ("holds 2 req/s at the slo (TTFT ≤ 50 ms for 90% of requests), fails at 3 req/s; its "
                              "step's attainment 1 (95% CI 0.839–1) passed within noise")
    many = steps[0].model_copy(update={"sent": 100, "met": 100})
    assert reduce_capacity(records, [many, *steps[1:]], load, slo).verdict.endswith("fails at 3 req/s")
    s1 = result.steps[1]
    assert s1.attainment == 0.5 and s1.attainment_ci[0] < 0.5 < s1.attainment_ci[1] and not s1.passed
    assert s1.metrics.value("ttft_ms.p50") == pytest.approx(105, abs=1) and s1.achieved_rate_rps == pytest.approx(10)
    assert result.steps[2].attainment == pytest.approx(17 / 18)  # of those that arrived before max_duration_s


def test_a_wait_for_the_backends_max_concurrency_counts_against_the_slo():
    """An open loop on a backend that serves one request at a time: the harness queues the others, and a user of
    the engine would wait that long for the first token."""
    slo = SLO(ttft_ms=50)
    prompt = RequestRecord(id=0, repetition=0, t_send=1.0, t_scheduled=1.0, chunk_times=[1.01], output_tokens=1)
    waited = RequestRecord(id=1, repetition=0, t_send=1.5, t_scheduled=1.5, t_queued=1.0, chunk_times=[1.51],
                           output_tokens=1)
    assert met_slo([prompt, waited], slo) == 1
    step = CapacityStep(step=0, value=2, start=1, end=2, sent=2, met=1, passed=False)
    result = reduce_capacity([prompt, waited], [step], CapacityLoad(type="capacity"), slo)
    p99 = result.steps[0].metrics.value("ttft_ms.p99")
    assert p99 == pytest.approx(10 + 0.99 * 500, abs=1)  # from arrival: 10 and 510 ms


def test_a_step_stores_the_slo_latencies_under_the_catalogues_names_and_a_schema_1_file_still_loads(tmp_path):
    slo = SLO(ttft_ms=50)
    records = [RequestRecord(id=i, repetition=0, t_send=i, chunk_times=[i + 0.01 * (i + 1), i + 0.1], output_tokens=2)
               for i in range(4)]
    step = CapacityStep(step=0, value=2, start=0, end=4, sent=4, met=4, passed=True)
    result = reduce_capacity(records, [step], CapacityLoad(type="capacity"), slo)
    stored = json.loads(result.model_dump_json())
    assert stored["slo"] == {"ttft_ms": 50}  # only the limits the scenario set, as before
    latencies = stored["steps"][0]["metrics"]
    assert set(latencies) == {"ttft_ms", "tpot_ms", "e2el_ms"}
    assert latencies["ttft_ms"]["count"] == 4 and latencies["ttft_ms"]["p50"] == pytest.approx(25)
    assert "ttft_p50_ms" not in stored["steps"][0]

    # schema 1 named four of those numbers ttft_p50_ms ... tpot_p99_ms: load_run reads them as the same statistics
    old_step = {"step": 0, "value": 2, "sent": 4, "attainment": 1.0, "ttft_p50_ms": 12.5, "ttft_p99_ms": 40.0,
                "tpot_p50_ms": 3.0, "tpot_p99_ms": None, "passed": True}
    old_cell = {"id": "c", "model": "m", "backend": "b", "workload": "w", "status": "ok",
                "capacity": {"search": "rate", "attainment_target": 0.9, "slo": {"ttft_ms": 50}, "capacity": 2,
                             "verdict": "holds 2 req/s", "steps": [old_step]}}
    (tmp_path / "results.json").write_text(json.dumps({"schema_version": 1, "cells": [old_cell]}))
    run = load_run(tmp_path)
    assert run.schema_version == SCHEMA_VERSION == 2
    got = run.cells[0].capacity
    assert got.slo == slo and got.steps[0].passed
    m = got.steps[0].metrics
    assert (m.value("ttft_ms.p50"), m.value("ttft_ms.p99"), m.value("tpot_ms.p50")) == (12.5, 40.0, 3.0)
    assert m.value("tpot_ms.p99") is None and m.value("ttft_ms.count") is None  # not in schema 1: not recorded
    assert m.distribution("e2el_ms") is None
    # a schema-1 file whose steps are not a list is named by validation, not a TypeError from the upgrade
    (tmp_path / "results.json").write_text(json.dumps({"schema_version": 1, "cells": [
        old_cell | {"capacity": old_cell["capacity"] | {"steps": 5}}]}))
    with pytest.raises(ResultsError, match="steps"):
        load_run(tmp_path)


# The scripted backend: 3 batch slots, each request 20 ms to its first token and 4 tokens 5 ms apart (35 ms in all).
SLOTS = {"name": "slots", "kind": "scripted", "options": {"ttft_s": 0.02, "itl_s": 0.005, "slots": 3}}


def capacity_workload(name, load, num_requests=24):
    return {"name": name, "input_tokens": 16, "output_tokens": 4, "num_requests": num_requests, "warmup_requests": 1,
            "load": {"type": "capacity", **load}}


def capacity_scenario(tiny_model, *workloads):
    # A request that waits for a slot waits a whole request (35 ms): its TTFT of 55+ ms misses the 40 ms slo.
    return scenario_dict(tiny_model, [SLOTS], list(workloads), slo={"ttft_ms": 40})


RATE_REQUESTS, RATE_TOLERANCE = 200, 4.0


@pytest.fixture(scope="module")
def searched(tiny_model, tmp_path_factory):
    """One run, both searches: concurrency (24 requests a step) and rate (200 a step, from 32 req/s)."""
    tmp = tmp_path_factory.mktemp("capacity")
    return run_scenario(capacity_scenario(
        tiny_model, capacity_workload("conc", {"search": "concurrency", "attainment": 0.9}),
        capacity_workload("rate", {"search": "rate", "start": 32, "attainment": 0.9, "tolerance": RATE_TOLERANCE},
                          RATE_REQUESTS)), tmp)


def test_a_concurrency_search_lands_on_the_backends_slots(searched):
    out, cells = searched
    cell = cells["conc"]
    cap = cell.capacity
    assert (cap.capacity, cap.fails_at) == (3, 4), cap
    assert [s.value for s in cap.steps] == [1, 2, 4, 3] and [s.passed for s in cap.steps] == [True, True, False, True]
    assert cap.capacity_rps == pytest.approx(3 / 0.035, rel=0.35)  # three at a time, 35 ms each
    assert cap.verdict.startswith("holds 3 in flight at the slo") and "fails at 4 in flight" in cap.verdict
    # the cell's metrics are its capacity step's: 24 requests, none of them waiting
    assert cell.metrics.value("completed") == 24 and cell.metrics.value("ttft_ms.p99") < 40
    assert cell.status == "ok"
    report = (out / "report.md").read_text()
    assert "holds 3 in flight" in report and "Capacity search steps: conc" in report
    # one search per cell, whatever repetitions says: no median over repetitions is claimed
    basis = "from the step at the search's capacity (one search per cell: repetitions do not apply)"
    assert f"Numbers are {basis}" in report and "medians over" not in report
    assert basis[0].upper() + basis[1:] in (out / "summary.md").read_text()


def test_a_capacity_search_needs_an_slo(write_scenario, tiny_model):
    data = capacity_scenario(tiny_model, capacity_workload("cap", {}))
    del data["slo"]
    done = subprocess.run([sys.executable, "-m", "harness.cli", "validate", str(write_scenario(data))], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "workloads[0].load: a capacity search needs the scenario's slo" in done.stdout + done.stderr


def test_validate_says_capacity_cells_run_one_search_each(write_scenario, tiny_model):
    from typer.testing import CliRunner

    from harness.cli import app

    def validate(data):
        done = CliRunner().invoke(app, ["validate", str(write_scenario(data))])
        assert done.exit_code == 0, done.output
        return done.output

    cap = capacity_workload("cap", {})
    fixed = {"name": "fixed", "input_tokens": 16, "output_tokens": 4, "num_requests": 4}
    assert "2 cell(s) = 1 model(s) × 1 backend(s) × 2 workload(s), 3 repetition(s) for 1 cell(s); 1 capacity " \
           "cell(s): one search each" in validate(capacity_scenario(tiny_model, cap, fixed) | {"repetitions": 3})
    # only searches: repetitions (here 1) neither counts nor earns the warning about too few
    only = validate(capacity_scenario(tiny_model, cap))
    assert "1 cell(s) = 1 model(s) × 1 backend(s) × 1 workload(s), capacity cells: one search each" in only
    assert "repetition" not in only


def test_a_capacity_cells_numbers_are_not_called_medians_over_repetitions():
    from harness.records import CellResult
    from harness.results.summary import numbers_basis

    def cell(load):
        spec = {"name": load, "input_tokens": 8, "output_tokens": 8, "num_requests": 4,
                "load": {"type": load, **({"rate": 1.0} if load == "poisson" else {})}}
        return CellResult(id=load, model="m", backend="b", workload=load, status="ok", workload_spec=spec)

    assert numbers_basis("3", [cell("poisson")]) == "medians over 3 repetition(s) of each cell"
    assert numbers_basis("3", [cell("poisson"), cell("capacity")]) == (
        "medians over 3 repetition(s) of each cell, a capacity search's from the step at the search's capacity "
        "(one search per cell: repetitions do not apply)")


def slot_step_passes(rate: float, seed: int, n: int, slots: int, service_s: float, max_wait_s: float,
                     attainment: float) -> bool:
    """Whether a step at `rate` passes on a server of `slots` slots, each request `service_s` long, first come first
    served, on the load generator's own Poisson schedule: the model the scripted backend with slots implements."""
    free = [0.0] * slots
    met = 0
    for a in poisson_offsets(n, rate, seed):
        start = max(a, heapq.heappop(free))
        heapq.heappush(free, start + service_s)
        met += start - a <= max_wait_s
    return met >= attainment * n


def test_a_rate_search_lands_within_one_bisection_step_of_the_knee(searched):
    """Under Poisson arrivals the knee is a band, not a point: the rates where a step of this many requests passes
    in 10% to 90% of schedules, found by simulating the same server on 60 schedules per rate. The search must end
    within one bisection step (its tolerance) of that band."""
    n, tolerance = RATE_REQUESTS, RATE_TOLERANCE
    cap = searched[1]["rate"].capacity
    # 35 ms per request; the slo's 40 ms TTFT leaves a wait of at most 20 ms beside the 20 ms of prefill
    chance = {rate: sum(slot_step_passes(rate, seed, n, 3, 0.035, 0.019, 0.9) for seed in range(60)) / 60
              for rate in range(30, 80)}
    band = (max(r for r, p in chance.items() if p >= 0.9), min(r for r, p in chance.items() if p <= 0.1))
    assert band[0] - tolerance <= cap.capacity <= band[1] + tolerance, (cap, band)
    assert cap.fails_at - cap.capacity <= tolerance and len(cap.steps) <= 9
    assert all(s.sent == n and s.achieved_rate_rps == pytest.approx(s.value, rel=0.15) for s in cap.steps)
