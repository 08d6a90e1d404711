"""The quickstart end to end: the README's first command on every CPU backend, then the report and the guide built
from what it wrote. The only tests that run the quickstart (tests/e2e/conftest.py); the report's and the guide's other
checks use synthetic or small scripted runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from backends.llama_cpp.server import find_binary
from harness.analyze.guide import build_guide, load_rules, write_guide
from harness.analyze.report import SUMMARY_COLUMNS, write_report
from harness.records import SCHEMA_VERSION
from harness.results.catalogue import fmt_value
from harness.results.runs import load_runs
from tests.analyze.test_report import Tags, external_references
from tests.analyze.test_report_browser import CHROMIUM, check_in_browser


@pytest.mark.slow
def test_quickstart_end_to_end(quickstart_results):
    """The README's first command, minus the install: results.json, requests.jsonl, summary.md and the report."""
    out = quickstart_results
    data = json.loads((out / "results.json").read_text())
    assert data["schema_version"] == SCHEMA_VERSION and data["environment"]["python"]
    assert data["environment"]["packages"]["torch"] and data["environment"]["cpu"]["logical_cores"] >= 1
    ran = [c for c in data["cells"] if c["status"] != "skipped"]
    for cell in data["cells"]:
        if cell["status"] == "skipped":  # optional: llama-server, where scripts/install-llama-server.sh has not run
            assert cell["backend"] == "llama-server" and find_binary() is None
            assert "scripts/install-llama-server.sh builds it" in cell["error"]
            continue
        assert cell["status"] == "ok", cell["error"]
        m = cell["metrics"]
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert m[key]["p50"] > 0 and m[key]["p99"] >= m[key]["p50"]
        assert m["output_throughput_tok_s"] > 0 and m["errors"] == 0
        assert m["total_output_tokens"] == 16 * 64 and cell["token_counts"]["exact_output_length"]
        assert len(cell["repetitions"]) == 3
        # the load generator on a CPU of its own wherever there are two (resources.isolate_client)
        assert cell["cpu_isolation"]["isolated"] == (len(os.sched_getaffinity(0)) >= 2)
        res = cell["resources"]
        assert res["whole"]["max_rss_bytes"] > 10 * 2**20 and set(res["phases"]) >= {"load", "prefill", "decode"}
        assert res["sample_interval_ms"] == 20 and res["page_cache"] in ("warm", "cold", "partial")
        assert (out / cell["timeline_file"]).is_file()
        if not data["environment"]["gpu"]["available"]:
            assert res["whole"]["max_process_vram_bytes"] is None and "max_process_vram_bytes" in res["unavailable"]
    summary = (out / "summary.md").read_text()
    assert all(c["backend"] in summary for c in data["cells"])
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    assert {c["backend"] for c in data["cells"]} >= {"hf", "own", "own-disk", "llamacpp", "llama-server", "vllm"}
    assert len((out / "requests.jsonl").read_text().splitlines()) == 16 * 3 * len(ran)
    # llama-server's 4 slots serve the load's 4 users at once; transformers serves 1, the others queued (and timed).
    cells = {c["backend"]: c for c in ran}
    assert cells["hf"]["concurrency_cap"] == {"requested": 4, "max_concurrency": 1, "queue_in_latency": True}
    if "llama-server" in cells:
        assert cells["llama-server"]["concurrency_cap"] is None and cells["llama-server"]["engine"]["parallel"] == 4


@pytest.fixture(scope="module")
def qs_report(quickstart_results, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qs-report")
    write_report([quickstart_results], out)
    return out


@pytest.mark.slow
def test_quickstart_report_has_every_backend_and_metric(quickstart_results, qs_report):
    data = json.loads((quickstart_results / "results.json").read_text())
    md, html = (qs_report / "report.md").read_text(), (qs_report / "report.html").read_text()
    assert data["cells"], "the quickstart wrote no cells"
    gpu = data["environment"]["gpu"]["available"]
    for text in (md, html):
        for header, _ in SUMMARY_COLUMNS:
            assert header in text or (header == "peak VRAM / budget" and not gpu)
        for cell in data["cells"]:
            assert cell["backend"] in text and cell["id"] in text
            if cell["status"] == "ok":
                m = cell["metrics"]
                for value, unit in ((m["ttft_ms"]["p50"], "ms"), (m["ttft_ms"]["p99"], "ms"),
                                    (m["tpot_ms"]["p50"], "ms"), (m["output_throughput_tok_s"], "tok/s"),
                                    (m["goodput_rps"], "req/s")):
                    assert fmt_value(value, unit) in text
        # VRAM not measured on a machine without a GPU: said once, with the reason, not a column of n/a.
        if not gpu:
            assert text.count("GPU measures (peak VRAM, utilisation, power, energy): not measured here: no NVIDIA") \
                == len({c["workload"] for c in data["cells"]})
        assert "Verdict" in text
    # Per-request box plots drawn from requests.jsonl: files for Markdown, inlined for HTML.
    drawn = sorted(p.name for p in (qs_report / "plots").glob("*.png"))
    assert any(n.startswith("ttft-") for n in drawn) and any(n.startswith("tpot-") for n in drawn)
    for name in drawn:
        assert (qs_report / "plots" / name).read_bytes().startswith(b"\x89PNG")
        assert f"](plots/{name})" in md
    assert html.count('src="data:image/png;base64,') == len(drawn)


@pytest.mark.slow
def test_quickstart_html_is_self_contained(qs_report):
    html = (qs_report / "report.html").read_text()
    assert external_references(html) == []
    tags = Tags(html).tags
    assert not [t for t, _ in tags if t == "script"]
    imgs = [a["src"] for t, a in tags if t == "img"]
    assert imgs and all(src.startswith("data:image/png;base64,") for src in imgs)


@pytest.mark.slow
def test_guide_from_quickstart(quickstart_results, tmp_path):
    data = json.loads((quickstart_results / "results.json").read_text())
    out = write_guide([quickstart_results], tmp_path / "guide.md")
    md = out.read_text()
    for c in data["cells"]:
        assert c["backend"] in md and c["id"] in md
    guide = {u.id: u for u in build_guide(load_runs([quickstart_results]), load_rules()).use_cases}
    # The quickstart runs on a CPU with short prompts: the 8 GB GPU case has nothing to go on, and says why.
    long_doc = guide["long-document-8gb"]
    assert long_doc.recommendation.startswith("No recommendation") and not long_doc.ranking.rows
    assert any("no cell ran on a GPU" in n for n in long_doc.not_measured)
    assert any("no workload has input_tokens ≥ 8192" in n for n in long_doc.not_measured)
    assert {r.values[1] for r in guide["cpu-chat"].ranking.rows} == {c["backend"] for c in data["cells"]}


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install chromium)")
def test_quickstart_report_renders(quickstart_results, tmp_path):
    write_report([quickstart_results], tmp_path / "out", ["html"])
    workloads = {c["workload"] for c in json.loads((quickstart_results / "results.json").read_text())["cells"]
                 if c["status"] == "ok"}
    assert workloads, "the quickstart has no completed cell"
    check_in_browser(tmp_path / "out" / "report.html", tmp_path,
                     [f"{m} per request: {w}" for w in workloads for m in ("TTFT", "TPOT")])
