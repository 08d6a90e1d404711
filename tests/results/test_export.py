"""`harness.results.to_dataframe` and `bench export`: tidy statistics with CIs, one row per request, and the same
numbers the report shows."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

import harness.results
from harness.analyze.report import build_report
from harness.cli import app
from harness.results.catalogue import CATALOGUE, STATISTICS, fmt_value
from harness.results.runs import load_runs
from tests.report_fixtures import ResultsBuilder, resources, workload


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    b = ResultsBuilder(tmp_path_factory.mktemp("export") / "run", repetitions=3)
    b.add("hf", workload("short", num_requests=6), 0.1, 0.01, resources=resources(None), rep_scale=[1, 1.1, 0.9])
    b.add("own", workload("short", num_requests=6), 0.05, 0.02, resources=resources(None), request_errors={2: "boom"})
    b.add("broken", workload("short", num_requests=6), 0.05, 0.02, failed="CUDA out of memory")
    return b.write()


def test_one_tidy_row_per_cell_metric_and_statistic(results):
    frame = harness.results.to_dataframe([results])
    data = json.loads((results / "results.json").read_text())
    hf = frame[frame.cell == "m__hf__short"]
    distributions = [k for k, m in CATALOGUE.items() if m.scope == "distribution"]
    assert len(hf[hf.metric == "ttft_ms"]) == 1 + len(STATISTICS)  # count and every statistic
    assert len(hf) == len(distributions) * (1 + len(STATISTICS)) + sum(m.scope != "distribution"
                                                                       for m in CATALOGUE.values())
    p50 = hf[(hf.metric == "ttft_ms") & (hf.statistic == "p50")].iloc[0]
    cell = next(c for c in data["cells"] if c["id"] == "m__hf__short")
    assert p50.value == cell["metrics"]["ttft_ms"]["p50"] and [p50.ci_low, p50.ci_high] == cell["ci"]["ttft_ms.p50"]
    assert p50.cv == pytest.approx(cell["cv"]["ttft_ms.p50"]) and p50.unit == "ms" and p50.better == "lower"
    thr = hf[hf.metric == "output_throughput_tok_s"].iloc[0]
    assert pd.isna(thr.statistic) and thr.ci_low <= thr.value <= thr.ci_high
    assert hf[hf.metric == "max_rss_bytes"].iloc[0].value == 3 * 2**30  # cell-scope, read as the report does
    assert set(frame[frame.cell == "m__broken__short"].status) <= {"failed"}


def test_count_rows_carry_no_unit_and_the_lengths_sent_are_exported(results):
    """A count of samples is no quantity in ms; the prompt and output lengths the requests had are distributions
    of their own (p50, range), exported beside the workload's settings."""
    frame = harness.results.to_dataframe([results])
    hf = frame[frame.cell == "m__hf__short"]
    counts = hf[hf.statistic == "count"]
    assert len(counts) == sum(m.scope == "distribution" for m in CATALOGUE.values())
    assert counts.unit.isna().all() and counts.better.isna().all()
    assert (hf[(hf.metric == "ttft_ms") & (hf.statistic == "p99")].unit == "ms").all()
    lengths = hf[hf.metric.isin(["input_len", "output_len"])].set_index(["metric", "statistic"]).value
    assert lengths[("input_len", "p50")] == lengths[("input_len", "max")] == 64  # workload(): 64 in, 16 out
    assert lengths[("output_len", "min")] == 16 and (hf[hf.metric == "output_len"].unit.dropna() == "tokens").all()


def test_one_row_per_request(results):
    frame = harness.results.to_dataframe(results, level="requests")
    assert len(frame) == 2 * 3 * 6  # two cells with requests files, three repetitions of six
    own = frame[frame.cell == "m__own__short"]
    assert (~own.ok).sum() == 3 and set(own[~own.ok].error) == {"boom"} and own[~own.ok].ttft_ms.isna().all()
    hf = frame[frame.cell == "m__hf__short"]
    assert hf.ttft_ms.min() == pytest.approx(0.1 * 0.9 * 1e3) and set(hf.repetition) == {0, 1, 2}
    assert hf.queued_ms.isna().all()  # nothing waited for a max_concurrency
    with pytest.raises(ValueError, match="level"):
        harness.results.to_dataframe(results, level="cells")


@pytest.mark.parametrize("fmt, read", [("csv", pd.read_csv), ("parquet", pd.read_parquet),
                                       ("jsonl", lambda p: pd.read_json(p, lines=True))])
def test_bench_export_writes_both_tables(results, tmp_path, fmt, read):
    r = CliRunner().invoke(app, ["export", str(results), "--format", fmt, "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    stats, requests = read(tmp_path / f"statistics.{fmt}"), read(tmp_path / f"requests.{fmt}")
    expected = harness.results.to_dataframe(results)
    assert len(stats) == len(expected) and list(stats.columns) == list(expected.columns)
    assert stats.value.sum() == pytest.approx(expected.value.astype(float).sum())
    assert len(requests) == 36


def test_bad_format_or_results_exit_2(results, tmp_path):
    r = CliRunner().invoke(app, ["export", str(results), "--format", "xlsx", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "--format: expected one of csv, parquet, jsonl" in r.output
    r = CliRunner().invoke(app, ["export", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "no such results file" in r.output and "Traceback" not in r.output


def test_the_report_shows_the_frames_numbers(results):
    """One source: the report's table cells are the frame's values and intervals."""
    frame = harness.results.to_dataframe(results)
    report = build_report(load_runs([results]))
    section = report.sections[0]
    col = section.table.headers.index("TTFT p50 (ms)")
    for row in section.table.rows:
        if row.cell == "m__broken__short":
            assert row.values[col] == "–"
            continue
        f = frame[(frame.cell == row.cell) & (frame.metric == "ttft_ms") & (frame.statistic == "p50")].iloc[0]
        assert row.values[col].text == fmt_value(f.value, "ms")
        assert row.values[col].ci == f"[{f.ci_low:.1f}–{f.ci_high:.1f}]"
