"""`bench run` end to end: the quickstart, failure isolation between cells, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.run.runner import Runner
from harness.config.load import load_scenario
from tests.conftest import scenario_dict

SCRIPTED = {"name": "ok", "kind": "scripted", "options": {"ttft_s": 0.005, "itl_s": 0.001}}




def run(path, out, **kw) -> int:
    return Runner(load_scenario(path), str(path), out, **kw).run()


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_quickstart_end_to_end(quickstart_results):
    """The README's first command, minus the install: results.json, requests.jsonl, summary.md and the report."""
    out = quickstart_results
    data = results(out)
    assert data["schema_version"] == 1 and data["environment"]["python"]
    assert data["environment"]["packages"]["torch"] and data["environment"]["cpu"]["logical_cores"] >= 1
    for cell in data["cells"]:
        assert cell["status"] == "ok", cell["error"]
        m = cell["metrics"]
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert m[key]["p50"] > 0 and m[key]["p99"] >= m[key]["p50"]
        assert m["output_throughput_tok_s"] > 0 and m["errors"] == 0
        assert m["total_output_tokens"] == 16 * 64 and cell["token_counts"]["exact_output_length"]
        assert len(cell["repetitions"]) == 3
        res = cell["resources"]
        assert res["whole"]["max_rss_bytes"] > 10 * 2**20 and set(res["phases"]) >= {"load", "prefill", "decode"}
        assert res["sample_interval_ms"] == 20 and res["page_cache"] in ("warm", "cold", "partial")
        assert (out / cell["timeline_file"]).is_file()
        if not data["environment"]["gpu"]["available"]:
            assert res["whole"]["max_process_vram_bytes"] is None and "max_process_vram_bytes" in res["unavailable"]
    summary = (out / "summary.md").read_text()
    assert all(c["backend"] in summary for c in data["cells"])
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    assert {c["backend"] for c in data["cells"]} >= {"hf", "own", "own-disk", "llamacpp", "llamacpp-server", "vllm"}
    assert len((out / "requests.jsonl").read_text().splitlines()) == 16 * 3 * len(data["cells"])


def test_a_crashing_cell_does_not_stop_the_others(write_scenario, tiny_model, tmp_path):
    backends = [
        {"name": "crash", "kind": "scripted", "options": {"crash_after": 2}},
        {"name": "broken", "kind": "scripted", "options": {"fail_if_exists": str(tiny_model / "config.json")}},
        SCRIPTED,
    ]
    path = write_scenario(scenario_dict(tiny_model, backends))
    assert run(path, tmp_path / "out") == 1
    cells = {c["backend"]: c for c in results(tmp_path / "out")["cells"]}
    assert cells["crash"]["status"] == "failed" and "SIGKILL" in cells["crash"]["error"]
    assert cells["broken"]["status"] == "failed" and "scripted start failure" in cells["broken"]["error"]
    assert cells["ok"]["status"] == "ok" and cells["ok"]["metrics"]["completed"] == 4
    assert "crash" in (tmp_path / "out" / "summary.md").read_text()


def test_a_hanging_cell_times_out(write_scenario, tiny_model, tmp_path):
    backends = [{"name": "hang", "kind": "scripted", "options": {"hang": True}}, SCRIPTED]
    path = write_scenario(scenario_dict(tiny_model, backends, cell_timeout_s=3))
    assert run(path, tmp_path / "out") == 1
    cells = {c["backend"]: c for c in results(tmp_path / "out")["cells"]}
    assert "timed out after 3 s" in cells["hang"]["error"] and cells["ok"]["status"] == "ok"


def test_failed_requests_are_counted_not_fatal(write_scenario, tiny_model, tmp_path):
    b = {"name": "flaky", "kind": "scripted", "options": {"fail_request_ids": [2, 3]}}  # ids 1..4 measured
    path = write_scenario(scenario_dict(tiny_model, [b]))
    assert run(path, tmp_path / "out") == 0
    m = results(tmp_path / "out")["cells"][0]["metrics"]
    assert m["errors"] == 2 and m["completed"] == 2 and m["error_rate"] == 0.5


def test_resume_reruns_only_missing_or_failed_cells(write_scenario, tiny_model, tmp_path):
    marker = tmp_path / "fail-now"
    marker.touch()
    backends = [SCRIPTED, {"name": "later", "kind": "scripted", "options": {"fail_if_exists": str(marker)}}]
    path = write_scenario(scenario_dict(tiny_model, backends))
    out = tmp_path / "out"
    assert run(path, out, only_backends=["later"]) == 1
    assert [c["status"] for c in results(out)["cells"]] == ["failed"]
    assert run(path, out, only_backends=["ok"], resume=True) == 1  # ok now runs; later still failed
    ok_before = results(out)["cells"][0]
    assert ok_before["backend"] == "ok" and ok_before["status"] == "ok"
    ok_records = (out / "cells" / ok_before["id"] / "requests.jsonl").stat().st_mtime_ns

    marker.unlink()
    assert run(path, out, resume=True) == 0
    data = results(out)
    assert [(c["backend"], c["status"]) for c in data["cells"]] == [("ok", "ok"), ("later", "ok")]
    assert data["cells"][0] == ok_before  # untouched
    assert (out / "cells" / ok_before["id"] / "requests.jsonl").stat().st_mtime_ns == ok_records
    assert len((out / "requests.jsonl").read_text().splitlines()) == 8


def test_results_survive_a_killed_runner(write_scenario, tiny_model, tmp_path):
    """results.json is rewritten atomically after each cell: kill the runner mid-matrix, the file still parses."""
    slow = {"name": "slow", "kind": "scripted", "options": {"ttft_s": 0.5}}
    path = write_scenario(scenario_dict(tiny_model, [SCRIPTED, slow]))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", str(path), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    import time
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "cells" / "tiny__slow__w" / "cell.json").exists():
        time.sleep(0.1)
    os.killpg(proc.pid, 9)
    proc.wait()
    data = results(out)
    assert [c["backend"] for c in data["cells"]] == ["ok"] and data["cells"][0]["status"] == "ok"


def test_ctrl_c_stops_the_worker_and_keeps_results(write_scenario, tiny_model, tmp_path):
    import signal
    import time

    import psutil

    backends = [SCRIPTED, {"name": "hang", "kind": "scripted", "options": {"hang": True}}]
    path = write_scenario(scenario_dict(tiny_model, backends))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", str(path), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "cells" / "tiny__hang__w" / "cell.json").exists():
        time.sleep(0.1)
    time.sleep(2.0)  # the worker starts and hangs in its first (warm-up) request
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)]
    assert workers, "the hanging cell's worker should be running"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert not [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    cells = {c["backend"]: c for c in results(out)["cells"]}
    assert cells["ok"]["status"] == "ok" and cells["hang"]["error"] == "interrupted by the user"


def test_disk_preflight_refuses_a_cell_and_cold_cache_is_recorded(write_scenario, tiny_model, tmp_path):
    import shutil

    too_much = shutil.disk_usage(tmp_path).free * 2
    backends = [{"name": "greedy", "kind": "scripted", "options": {"disk_need_bytes": too_much}}, SCRIPTED]
    path = write_scenario(scenario_dict(tiny_model, backends, resources={"drop_page_cache": True}))
    assert run(path, tmp_path / "out") == 1
    cells = {c["backend"]: c for c in results(tmp_path / "out")["cells"]}
    assert "disk preflight" in cells["greedy"]["error"] and "free" in cells["greedy"]["error"]
    assert cells["greedy"]["resources"] is None  # refused before anything ran
    assert cells["ok"]["resources"]["page_cache"] == "cold"
