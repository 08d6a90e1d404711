"""The typed pipeline end to end with the scripted backend: what reaches the engine, phases derived from the requests
under concurrent load, the harness queueing for a backend that serves one request at a time, and one catalogue."""

import json

import pytest

from harness.analyze.guide import write_guide
from harness.config.load import load_scenario
from harness.config.scenario import SLO
from harness.measure.phases import request_phases, subtract, union
from harness.records import CellPlan, Distribution, RequestRecord, WorkerReport, load_run, read_requests
from harness.results.catalogue import CATALOGUE, DISTRIBUTIONS, PER_REPETITION_SCALARS
from harness.results.metrics import reduce_repetition
from harness.run.runner import Runner
from tests.conftest import scenario_dict


def run_one(write_scenario, tiny_model, tmp_path, options: dict, workload: dict, report: bool = False, **extra):
    path = write_scenario(scenario_dict(tiny_model, [{"name": "s", "kind": "scripted", "options": options}],
                                        [{"name": "w", "input_tokens": 8, "num_requests": 4, "warmup_requests": 0,
                                          **workload}], **extra))
    out = tmp_path / "out"
    assert Runner(load_scenario(path), str(path), out, in_process=True, write_report=report).run() == 0
    run = load_run(out)
    (cell,) = run.cells
    return out, cell


def test_sampled_requests_reach_the_engine_with_their_temperature(write_scenario, tiny_model, tmp_path):
    out, cell = run_one(write_scenario, tiny_model, tmp_path, {"record_requests": True, "ttft_s": 0.001},
                        {"output_tokens": 2, "temperature": 0.7, "warmup_requests": 1}, seed=5)
    seen = [json.loads(line) for line in (out / "cells" / cell.id / "seen.jsonl").read_text().splitlines()]
    assert len(seen) == 5 and {s["temperature"] for s in seen} == {0.7}
    assert [s["seed"] for s in seen] == [5 + s["id"] for s in seen]  # scenario seed + request index
    # The worker read a typed plan and wrote a typed report.
    plan = CellPlan.model_validate_json((out / "cells" / cell.id / "cell.json").read_text())
    assert plan.workload.temperature == 0.7 and plan.seed == 5
    assert WorkerReport.model_validate_json((out / "cells" / cell.id / "worker.json").read_text()).status == "ok"


def test_phases_under_concurrency_come_from_the_requests(write_scenario, tiny_model, tmp_path):
    # Two waves of 4 concurrent requests: each spends 0.3 s in prefill (spinning a CPU) and 0.25 s decoding
    # (sleeping), all 4 together, so prefill lasts 0.6 s in all and decode 0.5 s, whatever their interleaving.
    # The spinning threads on every CPU (not isolated from the load generator's): up to 200% of a core on 2 CPUs.
    out, cell = run_one(write_scenario, tiny_model, tmp_path,
                        {"ttft_s": 0.3, "itl_s": 0.05, "busy_prefill": True},
                        {"output_tokens": 6, "num_requests": 8, "load": {"type": "concurrency", "concurrency": 4}},
                        resources={"isolate_client": False})
    phases = cell.resources.phases
    assert set(phases) >= {"load", "prefill", "decode"}
    assert phases["prefill"].duration_s == pytest.approx(0.6, rel=0.25)
    assert phases["decode"].duration_s == pytest.approx(0.5, rel=0.25)
    # The CPU burnt in prefill lands in prefill: a mark per request would have mixed the two.
    assert phases["prefill"].cpu_percent_mean > 50, phases
    assert phases["decode"].cpu_percent_mean < phases["prefill"].cpu_percent_mean / 3, phases
    timeline = json.loads((out / cell.timeline_file).read_text())
    assert {p[0] for p in timeline["phases"]} >= {"load", "prefill", "decode"}
    assert all(len(p) == 3 and p[2] >= p[1] for p in timeline["phases"])


def test_max_concurrency_is_honoured_by_queueing(write_scenario, tiny_model, tmp_path):
    """4 users at once on a backend that serves 1: the harness queues 3, and each one's latency counts its wait from
    when its user offered it (the load asked for is the same for every backend); the results say so beside it."""
    out, cell = run_one(write_scenario, tiny_model, tmp_path, {"ttft_s": 0.02, "itl_s": 0.01, "max_concurrency": 1},
                        {"output_tokens": 3, "load": {"type": "concurrency", "concurrency": 4}}, report=True)
    assert cell.concurrency_cap is not None and cell.concurrency_cap.queue_in_latency
    assert (cell.concurrency_cap.requested, cell.concurrency_cap.max_concurrency) == (4, 1)
    records = sorted(read_requests(cell.requests_path(out)), key=lambda r: r.t_send)
    assert len(records) == 4
    for a, b in zip(records, records[1:]):
        assert b.t_send >= a.chunk_times[-1], "a second request was sent while the first was in flight"
    # All 4 were offered at once; 3 waited for the one slot, their TTFT from the offer.
    assert records[0].t_queued is None and all(r.t_queued is not None for r in records[1:])
    assert all(abs(r.t_queued - records[0].t_send) < 0.02 for r in records[1:])
    for k, r in enumerate(records):
        assert r.ttft == pytest.approx(r.t_send - (r.t_queued or r.t_send) + r.served_ttft)
        assert r.ttft >= k * 0.04  # each waited for the k served before it (20 ms + 2 × 10 ms each)
    assert cell.metrics.value("ttft_ms.p50") > 50  # the waits (20, 60, 100, 140 ms), not the engine's 20 ms alone
    served = "served 1 at a time (asked 4)"
    assert served in (out / "summary.md").read_text()
    report = (out / "report.md").read_text()
    assert f"s ({served})" in report and "count the wait for a free slot" in report
    guide = write_guide([out], out / "guide.md").read_text()
    assert f"s ({served})" in guide and f"{served}, its latencies count the wait" in guide


def test_poisson_arrivals_are_queued_too(write_scenario, tiny_model, tmp_path):
    out, cell = run_one(write_scenario, tiny_model, tmp_path, {"ttft_s": 0.05, "itl_s": 0.01, "max_concurrency": 1},
                        {"output_tokens": 2, "load": {"type": "poisson", "rate": 1000}})
    records = sorted(read_requests(cell.requests_path(out)), key=lambda r: r.t_send)
    assert all(b.t_send >= a.chunk_times[-1] for a, b in zip(records, records[1:]))
    assert cell.concurrency_cap.requested == 4 and cell.concurrency_cap.max_concurrency == 1


def test_phase_intervals():
    assert union([(3, 4), (0, 1), (0.5, 2)]) == [(0, 2), (3, 4)]
    assert subtract([(0, 10)], [(2, 3), (5, 6)]) == [(0, 2), (3, 5), (6, 10)]
    a = RequestRecord(id=0, repetition=0, t_send=0.0, chunk_times=[1.0, 2.0, 3.0])
    b = RequestRecord(id=1, repetition=0, t_send=2.5, chunk_times=[4.0, 5.0])
    assert request_phases([a, b], load=(-1.0, 0.0)) == {
        "load": [(-1.0, 0.0)], "prefill": [(0.0, 1.0), (2.5, 4.0)], "decode": [(1.0, 2.5), (4.0, 5.0)]}


def test_the_catalogue_declares_every_number_the_reducer_computes():
    rep = reduce_repetition([], SLO())
    assert set(rep.keys()) == set(DISTRIBUTIONS) | set(PER_REPETITION_SCALARS)
    assert all(isinstance(rep.raw(k), Distribution) for k in DISTRIBUTIONS)
    assert all(m.unit and m.label for m in CATALOGUE.values())
