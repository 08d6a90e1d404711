"""The reducer's formulas, on hand-made records and through a whole run of a backend with known timings."""

import json
import math

import pytest

from harness.records import Distribution, MetricValues, RequestRecord, ResourceUsage
from harness.results.metrics import median_over_repetitions, reduce_repetition
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
    assert m.value("ttft_ms.mean") == pytest.approx(200) and m.value("ttft_ms.count") == 2
    assert m.value("ttft_ms.p50") == pytest.approx(200) and m.value("ttft_ms.p90") == pytest.approx(280)
    assert m.value("tpot_ms.min") == pytest.approx(20) and m.value("tpot_ms.max") == pytest.approx(100)
    assert m.value("e2el_ms.max") == pytest.approx(500)
    # ITL pools every gap of every request: 20, 20, 20, 100, 100
    assert m.value("itl_ms.count") == 5 and m.value("itl_ms.mean") == pytest.approx(52)
    # duration: first dispatch (0.0) to last completion (0.55)
    assert m.value("duration_s") == pytest.approx(0.55)
    assert m.value("request_throughput_rps") == pytest.approx(2 / 0.55)
    assert m.value("output_throughput_tok_s") == pytest.approx(7 / 0.55)
    assert m.value("total_token_throughput_tok_s") == pytest.approx(27 / 0.55)
    assert m.value("goodput_rps") == pytest.approx(1 / 0.55)  # only request 0 meets ttft <= 200 ms
    assert m.value("errors") == 1 and m.value("error_rate") == pytest.approx(1 / 3)
    assert m.value("prefill_tps.max") == pytest.approx(10 / 0.1)
    assert m.value("decode_tps.min") == pytest.approx(2 / 0.2)


def test_no_slo_means_no_goodput_and_single_token_has_no_tpot():
    m = reduce_repetition([rec(0, 0.0, [0.5])], SLO())
    assert m.value("goodput_rps") is None
    assert m.value("tpot_ms.count") == 0 and m.value("tpot_ms.p50") is None
    assert m.value("ttft_ms.p50") == pytest.approx(500)


def test_percentiles_are_numpy_linear():
    s = Distribution.of([1.0, 2.0, 3.0, 4.0])
    assert s.p50 == 2.5 and s.p99 == pytest.approx(3.97) and s.std == pytest.approx(math.sqrt(1.25))


def test_median_over_repetitions():
    reps = [MetricValues.model_validate({"a": {"p50": v}, "b": v * 10, "c": None}) for v in (1.0, 5.0, 2.0)]
    m = median_over_repetitions(reps)
    assert m.model_dump(exclude_defaults=True) == {"a": {"p50": 2.0}, "b": 20.0, "c": None}


def test_known_timings_through_a_whole_run(write_scenario, tiny_model, tmp_path):
    """A backend that stamps tokens at exactly ttft + k·itl: every metric comes out as scripted."""
    from harness.run.runner import Runner
    from harness.config.load import load_scenario

    ttft, itl, n_out = 0.030, 0.004, 12
    b = {"name": "s", "kind": "scripted", "options": {"ttft_s": ttft, "itl_s": itl}}
    wl = [{"name": "w", "input_tokens": 16, "output_tokens": n_out, "num_requests": 6, "warmup_requests": 1}]
    path = write_scenario(scenario_dict(tiny_model, [b], wl, repetitions=2, slo={"ttft_ms": 1000}))
    assert Runner(load_scenario(path), str(path), tmp_path / "out", in_process=True,
                  write_report=False).run() == 0
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


# ---- uncertainty, stability, honest failures ----------------------------------------------------------------------

def lognormal_records(reps: int, n: int, seed: int = 0, scale=None, n_out: int = 16) -> list[RequestRecord]:
    """Sequential requests with 10% lognormal noise on TTFT and on every gap; `scale[rep]` slows a repetition."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out, t = [], 0.0
    for rep in range(reps):
        s = (scale or [1.0] * reps)[rep]
        for i in range(n):
            first = t + 0.05 * s * rng.lognormal(0, 0.1)
            times = [first, *(first + np.cumsum(0.01 * s * rng.lognormal(0, 0.1, n_out - 1)))]
            out.append(RequestRecord(id=rep * n + i, repetition=rep, t_send=t, chunk_times=[float(x) for x in times],
                                     chunk_tokens=[1] * n_out, input_tokens=32, output_tokens=n_out))
            t = times[-1] + 0.001
    return out


def test_confidence_intervals_hold_the_estimate_and_say_how_they_were_made():
    from harness.results.catalogue import HEADLINE
    from harness.results.metrics import reduce_cell

    for reps, method in ((1, "bootstrap over requests"), (2, "bootstrap over requests"),
                         (3, "bootstrap over repetitions"), (5, "bootstrap over repetitions")):
        d = reduce_cell(lognormal_records(reps, 20), reps, SLO(ttft_ms=55), max_cv=0.25)
        assert d["ci_method"] == method and d["unstable"] is None
        assert set(d["ci"]) == set(HEADLINE), set(HEADLINE) - set(d["ci"])
        for name, (lo, hi) in d["ci"].items():
            v = d["metrics"].value(name)
            assert lo <= v <= hi, (reps, name, lo, v, hi)
        assert all(set(rep.ci) == set(HEADLINE) for rep in d["repetitions"])
    # Over requests the TTFT p50 interval of 20 requests with 10% noise is a few percent wide, not zero or 50%.
    d = reduce_cell(lognormal_records(1, 20), 1, SLO(), max_cv=0.25)
    lo, hi = d["ci"]["ttft_ms.p50"]
    assert 0.01 < (hi - lo) / d["metrics"].value("ttft_ms.p50") < 0.3
    # With many more requests it narrows, as a CI should.
    d400 = reduce_cell(lognormal_records(1, 400), 1, SLO(), max_cv=0.25)
    lo4, hi4 = d400["ci"]["ttft_ms.p50"]
    assert (hi4 - lo4) < (hi - lo) / 2.5


def test_itl_interval_resamples_whole_requests():
    """ITL gaps are pooled per request: a cell whose requests differ (not its gaps) has a wide ITL interval."""
    from harness.results.metrics import reduce_cell

    steady = [rec(i, i * 1.0, [i + 0.1 + 0.01 * k for k in range(20)]) for i in range(10)]
    mixed = [rec(i, i * 1.0, [i + 0.1 + (0.005 if i % 2 else 0.02) * k for k in range(20)]) for i in range(10)]
    w_steady = reduce_cell(steady, 1, SLO(), 0.25)["ci"]["itl_ms.p50"]
    w_mixed = reduce_cell(mixed, 1, SLO(), 0.25)["ci"]["itl_ms.p50"]
    assert w_steady[1] - w_steady[0] < 1e-6 and w_mixed[1] - w_mixed[0] > 5


def test_repetitions_that_disagree_are_unstable_with_the_reason():
    from harness.results.metrics import reduce_cell

    d = reduce_cell(lognormal_records(2, 10, scale=[1.0, 10.0]), 2, SLO(), max_cv=0.25)
    assert d["unstable"].startswith("repetitions disagree beyond max_repetition_cv 0.25: TTFT p50 ")
    assert "out tok/s" in d["unstable"] and d["cv"]["ttft_ms.p50"] == pytest.approx(9 / 11, abs=0.05)
    assert d["metrics"].value("ttft_p99_cv") == d["cv"]["ttft_ms.p99"]
    # 20% apart is within a 0.25 CV (two values: CV = 0.1), not within 0.05.
    assert reduce_cell(lognormal_records(2, 10, scale=[1.0, 1.2]), 2, SLO(), max_cv=0.25)["unstable"] is None
    assert reduce_cell(lognormal_records(2, 10, scale=[1.0, 1.2]), 2, SLO(), max_cv=0.05)["unstable"]


def test_background_note_names_other_processes():
    from harness.results.metrics import background_note

    res = ResourceUsage.model_validate({
        "whole": {"other_cpu_percent": 140.0, "steal_percent": 3.0, "load_avg_max": 3.2},
        "repetitions": [{"other_cpu_percent": 5.0}, {"other_cpu_percent": 180.0}]})
    assert background_note(res) == ("other processes on the machine used 140% of a core on average (per repetition: "
                                    "5%, 180%), load average up to 3.2, 3% of a core stolen by the hypervisor")
    assert background_note(ResourceUsage.model_validate({"whole": {}})) is None and background_note(None) is None


def test_error_reasons_are_never_empty():
    import httpx

    from harness.core.errors import describe

    assert describe(httpx.ReadTimeout("")) == "ReadTimeout: Timed out while receiving data from the host."
    try:
        try:
            raise TimeoutError("timed out")
        except TimeoutError as inner:
            raise httpx.ReadTimeout("") from inner
    except httpx.ReadTimeout as e:
        assert describe(e) == "ReadTimeout: timed out"
    assert describe(ValueError("bad")) == "ValueError: bad"
    assert describe(type("Quiet", (Exception,), {})()) == "Quiet: (the exception carries no message)"


# ---- one catalogue ------------------------------------------------------------------------------------------------

def test_goodput_and_a_capacity_step_judge_the_slo_alike_from_the_offer():
    """One SLO predicate: a request that waited 100 ms in the harness's queue (a backend's max_concurrency) counts that
    wait, as its user waited; a client that sent 100 ms late adds nothing (that is latency from the schedule)."""
    from harness.results.capacity import met_slo
    from harness.results.catalogue import SLO_METRICS, meets_slo

    assert set(SLO_METRICS) == set(SLO.model_fields)  # every limit is judged on a catalogue metric
    queued = RequestRecord(id=0, repetition=0, t_queued=0.0, t_send=0.1, chunk_times=[0.15, 0.16], output_tokens=2)
    late = RequestRecord(id=1, repetition=0, t_scheduled=0.0, t_send=0.1, chunk_times=[0.15, 0.16], output_tokens=2)
    slo = SLO(ttft_ms=120)
    assert [meets_slo(r, slo) for r in (queued, late)] == [False, True]
    assert met_slo([queued, late], slo) == 1
    rep = reduce_repetition([queued, late], slo)
    assert rep.value("goodput_rps") == pytest.approx(1 / rep.value("duration_s"))


def test_every_per_request_sample_comes_from_the_catalogues_extractor():
    """The reducer's distributions are the catalogue's extractors over the requests, and the frame's, the gate's and
    the report's per-request samples are the same ones."""
    from harness.results.catalogue import REQUEST_METRICS

    records = lognormal_records(1, 12)
    rep = reduce_repetition(records, SLO())
    for key, m in REQUEST_METRICS.items():
        assert rep.distribution(key) == Distribution.of(m.samples(records)), key
    r = records[0]
    assert REQUEST_METRICS["ttft_ms"].of(r) == pytest.approx((r.chunk_times[0] - r.t_send) * 1e3)
    assert REQUEST_METRICS["tpot_ms"].of(r) == pytest.approx(r.tpot * 1e3)


def test_one_formatter_prints_a_number_alike_everywhere():
    """summary.md and the report print one number the same way (the catalogue's formatter, by the metric's unit)."""
    from harness.results.catalogue import CATALOGUE, fmt_interval, fmt_number, fmt_value

    assert [fmt_number(v, "ms") for v in (5.123, 12.345, 1234.5)] == ["5.12", "12.3", "1234.5"]
    assert fmt_number(0.01234, "ratio") == "0.0123" and fmt_number(12, "count") == "12"
    assert CATALOGUE["tpot_ms"].format(12.345) == fmt_value(12.345, "ms").removesuffix(" ms") == "12.3"
    assert fmt_interval((9.5, 10.25), "ms", 10.0) == "[9.5–10.2]"  # the bounds in the value's precision
