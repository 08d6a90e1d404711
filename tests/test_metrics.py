"""The reducer's formulas, on hand-made records and through a whole run of a backend with known timings."""

import json
import math

import pytest

from harness.records import RequestRecord
from harness.results.metrics import median_over_repetitions, reduce_repetition, stats
from harness.config.scenario import SLO
from tests.conftest import scenario_dict


def rec(i, t_send, times, n_in=10, error=None):
    return RequestRecord(id=i, repetition=0, t_send=t_send, chunk_times=times, chunk_tokens=[1] * len(times),
                         input_tokens=n_in, output_tokens=len(times), error=error)


def test_formulas_by_hand():
    records = [
        rec(0, 0.0, [0.10, 0.12, 0.14, 0.16]),          # ttft 100 ms, tpot 20 ms, e2el 160 ms
        rec(1, 0.05, [0.35, 0.45, 0.55]),               # ttft 300 ms, tpot 100 ms, e2el 500 ms
        rec(2, 0.06, [], error="BackendError: boom"),   # counted as an error, in no latency
    ]
    m = reduce_repetition(records, SLO(ttft_ms=200))
    assert m["ttft_ms"]["mean"] == pytest.approx(200) and m["ttft_ms"]["count"] == 2
    assert m["ttft_ms"]["p50"] == pytest.approx(200) and m["ttft_ms"]["p90"] == pytest.approx(280)
    assert m["tpot_ms"]["min"] == pytest.approx(20) and m["tpot_ms"]["max"] == pytest.approx(100)
    assert m["e2el_ms"]["max"] == pytest.approx(500)
    # ITL pools every gap of every request: 20, 20, 20, 100, 100
    assert m["itl_ms"]["count"] == 5 and m["itl_ms"]["mean"] == pytest.approx(52)
    # duration: first dispatch (0.0) to last completion (0.55)
    assert m["duration_s"] == pytest.approx(0.55)
    assert m["request_throughput_rps"] == pytest.approx(2 / 0.55)
    assert m["output_throughput_tok_s"] == pytest.approx(7 / 0.55)
    assert m["total_token_throughput_tok_s"] == pytest.approx(27 / 0.55)
    assert m["goodput_rps"] == pytest.approx(1 / 0.55)  # only request 0 meets ttft <= 200 ms
    assert m["errors"] == 1 and m["error_rate"] == pytest.approx(1 / 3)
    assert m["prefill_tps"]["max"] == pytest.approx(10 / 0.1)
    assert m["decode_tps"]["min"] == pytest.approx(2 / 0.2)


def test_no_slo_means_no_goodput_and_single_token_has_no_tpot():
    m = reduce_repetition([rec(0, 0.0, [0.5])], SLO())
    assert m["goodput_rps"] is None
    assert m["tpot_ms"]["count"] == 0 and m["tpot_ms"]["p50"] is None
    assert m["ttft_ms"]["p50"] == pytest.approx(500)


def test_percentiles_are_numpy_linear():
    s = stats([1.0, 2.0, 3.0, 4.0])
    assert s["p50"] == 2.5 and s["p99"] == pytest.approx(3.97) and s["std"] == pytest.approx(math.sqrt(1.25))


def test_median_over_repetitions():
    reps = [{"a": {"p50": v}, "b": v * 10, "c": None} for v in (1.0, 5.0, 2.0)]
    m = median_over_repetitions(reps)
    assert m == {"a": {"p50": 2.0}, "b": 20.0, "c": None}


def test_known_timings_through_a_whole_run(write_scenario, tiny_model, tmp_path):
    """A backend that stamps tokens at exactly ttft + k·itl: every metric comes out as scripted."""
    from harness.run.runner import Runner
    from harness.config.load import load_scenario

    ttft, itl, n_out = 0.030, 0.004, 12
    b = {"name": "s", "kind": "scripted", "options": {"ttft_s": ttft, "itl_s": itl}}
    wl = [{"name": "w", "input_tokens": 16, "output_tokens": n_out, "num_requests": 6, "warmup_requests": 1}]
    path = write_scenario(scenario_dict(tiny_model, [b], wl, repetitions=2, slo={"ttft_ms": 1000}))
    assert Runner(load_scenario(path), str(path), tmp_path / "out").run() == 0
    cell = json.loads((tmp_path / "out" / "results.json").read_text())["cells"][0]
    m = cell["metrics"]
    assert m["ttft_ms"]["p50"] == pytest.approx(ttft * 1e3, abs=2.0)  # t_send precedes the engine by microseconds
    assert m["tpot_ms"]["mean"] == pytest.approx(itl * 1e3, rel=1e-6)
    assert m["itl_ms"]["p99"] == pytest.approx(itl * 1e3, rel=1e-6)
    assert m["e2el_ms"]["p50"] == pytest.approx((ttft + (n_out - 1) * itl) * 1e3, abs=2.0)
    assert m["completed"] == 6 and m["errors"] == 0 and m["total_output_tokens"] == 6 * n_out
    e2el = ttft + (n_out - 1) * itl  # sequential: duration is six back-to-back requests plus loop overhead
    assert 6 / m["request_throughput_rps"] == pytest.approx(6 * e2el, rel=0.15)
    assert m["goodput_rps"] == pytest.approx(m["request_throughput_rps"])
    assert len(cell["repetitions"]) == 2 and cell["token_counts"]["output"] == ["engine"]
    lines = (tmp_path / "out" / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 12 and json.loads(lines[0])["cell"] == cell["id"]
