"""`bench run` through the Runner: failure isolation between cells, resume (the quickstart: tests/e2e)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from harness.run.runner import Runner
from harness.config.load import load_scenario
from tests.conftest import scenario_dict

SCRIPTED = {"name": "ok", "kind": "scripted", "options": {"ttft_s": 0.005, "itl_s": 0.001}}


def run(path, out, **kw) -> int:
    return Runner(load_scenario(path), str(path), out, **kw).run()


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_progress_lines_when_stdout_is_not_a_terminal(write_scenario, tiny_model, tmp_path):
    """A CI log gets a line per cell start and end and per cell done (rich's bar would print nothing until the
    end there), with the requests done so far."""
    import io

    from rich.console import Console

    log = io.StringIO()
    path = write_scenario(scenario_dict(tiny_model, [SCRIPTED]))
    assert Runner(load_scenario(path), str(path), tmp_path / "out", console=Console(file=log, width=200)).run() == 0
    lines = log.getvalue().splitlines()
    cell = results(tmp_path / "out")["cells"][0]["id"]
    started = next(i for i, line in enumerate(lines) if line.startswith(f"{cell}: started, 0/4 requests"))
    ended = next(i for i, line in enumerate(lines) if line.startswith(f"{cell}: ended, 4/4 requests"))
    done = next(i for i, line in enumerate(lines) if line.startswith("cells: 1/1 cells done"))
    assert started < ended < done


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


def test_the_worker_process_starts_with_the_backends_process_environment(write_scenario, tiny_model, tmp_path):
    """Read as a process starts by some libraries (glibc's MALLOC_ARENA_MAX): set in the worker's own environment
    once it runs would be too late."""
    backends = [{"name": "env", "kind": "scripted", "options": {"process_env": {"LLMBENCH_TEST_STARTED_WITH": "1"}}}]
    path = write_scenario(scenario_dict(tiny_model, backends))
    assert run(path, tmp_path / "out") == 0, results(tmp_path / "out")["cells"][0]["error"]


def test_a_hanging_cell_times_out(write_scenario, tiny_model, tmp_path):
    backends = [{"name": "hang", "kind": "scripted", "options": {"hang": True}}, SCRIPTED]
    path = write_scenario(scenario_dict(tiny_model, backends, cell_timeout_s=3))
    assert run(path, tmp_path / "out") == 1
    cells = {c["backend"]: c for c in results(tmp_path / "out")["cells"]}
    assert "timed out after 3 s" in cells["hang"]["error"] and cells["ok"]["status"] == "ok"


def test_failed_requests_fail_the_cell_beyond_max_error_rate(write_scenario, tiny_model, tmp_path):
    """max_error_rate defaults to 0: one failed request fails the cell, with the errors' reasons; a tolerated rate
    (scenario-wide, or per workload) keeps it ok with the errors counted."""
    flaky = {"name": "flaky", "kind": "scripted", "options": {"fail_request_ids": [2, 3]}}  # ids 1..4 measured
    path = write_scenario(scenario_dict(tiny_model, [flaky]))
    assert run(path, tmp_path / "strict", in_process=True, write_report=False) == 1
    cell = results(tmp_path / "strict")["cells"][0]
    assert cell["status"] == "failed"
    assert cell["error"] == ("2 of 4 requests failed (error rate 0.5 > max_error_rate 0); first errors: "
                             "BackendError: scripted failure of request 2 (1×); BackendError: scripted failure of "
                             "request 3 (1×)")
    assert "failed" in (tmp_path / "strict" / "summary.md").read_text()

    path = write_scenario(scenario_dict(tiny_model, [flaky], max_error_rate=0.5))
    assert run(path, tmp_path / "tolerant", in_process=True, write_report=False) == 0
    m = results(tmp_path / "tolerant")["cells"][0]["metrics"]
    assert m["errors"] == 2 and m["completed"] == 2 and m["error_rate"] == 0.5

    workloads = [{"name": "w", "input_tokens": 16, "output_tokens": 8, "num_requests": 4, "warmup_requests": 1,
                  "max_error_rate": 0.25}]
    path = write_scenario(scenario_dict(tiny_model, [flaky], workloads, max_error_rate=0.5))
    # the workload's own limit wins
    assert run(path, tmp_path / "per-workload", in_process=True, write_report=False) == 1


def test_a_server_killed_mid_run_fails_the_cell_named_and_resume_retries_it(write_scenario, tiny_model, tmp_path):
    """The launched server dies after two requests: the cell fails saying so (not as its requests' connection
    errors), the rest of the cell is not sent, and --resume runs it again."""
    marker = tmp_path / "kill-now"
    marker.touch()
    victim = {"name": "victim", "kind": "scripted",
              "options": {"server": True, "kill_server_at": 3, "kill_server_while_exists": str(marker)}}
    path = write_scenario(scenario_dict(tiny_model, [victim, SCRIPTED], repetitions=2))
    out = tmp_path / "out"
    assert run(path, out) == 1
    cells = {c["backend"]: c for c in results(out)["cells"]}
    error = cells["victim"]["error"]
    assert cells["victim"]["status"] == "failed"
    assert error.startswith("scripted_server exited (SIGKILL) after 2 requests\nlast lines of "), error
    assert "ConnectionRefused" not in error.splitlines()[0]
    sent = (out / "cells" / cells["victim"]["id"] / "requests.jsonl").read_text().splitlines()
    assert len(sent) == 3  # two ok, the one that found the server dead; nothing sent after
    assert cells["ok"]["status"] == "ok"

    marker.unlink()
    assert run(path, out, resume=True) == 0
    cells = {c["backend"]: c for c in results(out)["cells"]}
    assert cells["victim"]["status"] == "ok" and cells["victim"]["metrics"]["completed"] == 4


def test_repetitions_that_differ_tenfold_are_unstable(write_scenario, tiny_model, tmp_path):
    """The second repetition is ten times slower: the cell stays ok, is marked unstable with the reason, and says
    what else ran on the machine meanwhile; the summary and the report say so too."""
    slow = {"name": "slow2", "kind": "scripted", "options": {"ttft_s": 0.01, "itl_s": 0.002, "slow_from_id": 5,
                                                              "slow_factor": 10}}
    path = write_scenario(scenario_dict(tiny_model, [slow, SCRIPTED], repetitions=2))
    out = tmp_path / "out"
    assert run(path, out, in_process=True) == 0
    cells = {c["backend"]: c for c in results(out)["cells"]}
    unstable = cells["slow2"]["unstable"]
    assert cells["slow2"]["status"] == "ok" and unstable.startswith("repetitions disagree beyond max_repetition_cv")
    assert "TTFT p50" in unstable and "other processes on the machine used" in unstable
    for name in ("ttft_ms.p50", "ttft_ms.p99", "itl_ms.p50", "output_throughput_tok_s"):
        lo, hi = cells["ok"]["ci"][name]
        assert lo <= hi and cells["ok"]["ci_method"] == "bootstrap over requests"
    assert cells["slow2"]["cv"]["ttft_ms.p50"] > 0.7  # two values, 1 : 10: CV 9/11
    assert "## Unstable cells" in (out / "summary.md").read_text()
    html = (out / "report.html").read_text()
    assert "slow2 is unstable" in html and 'class="mark unstable"' in html
    whole = cells["slow2"]["resources"]["whole"]
    assert whole["other_cpu_percent"] >= 0 and len(cells["slow2"]["resources"]["repetitions"]) == 2


def test_three_repetitions_give_cis_across_repetitions(write_scenario, tiny_model, tmp_path):
    converts = {**SCRIPTED, "options": {**SCRIPTED["options"], "prepare_s": 1.5}}
    path = write_scenario(scenario_dict(tiny_model, [converts], repetitions=3))
    assert run(path, tmp_path / "out", in_process=True, write_report=False) == 0
    cell = results(tmp_path / "out")["cells"][0]
    # One-off preparation (a GGUF conversion) is timed apart: not in the load time.
    assert cell["prepare_time_s"] >= 1.5 and cell["load_time_s"] < 1.0
    assert cell["ci_method"] == "bootstrap over repetitions" and len(cell["repetitions"]) == 3
    values = [rep["output_throughput_tok_s"] for rep in cell["repetitions"]]
    lo, hi = cell["ci"]["output_throughput_tok_s"]
    assert min(values) <= lo <= cell["metrics"]["output_throughput_tok_s"] <= hi <= max(values)
    assert all("ttft_ms.p50" in rep["ci"] for rep in cell["repetitions"])  # each repetition's own, over requests


def test_resume_reruns_only_missing_or_failed_cells(write_scenario, tiny_model, tmp_path):
    marker = tmp_path / "fail-now"
    marker.touch()
    backends = [SCRIPTED, {"name": "later", "kind": "scripted", "options": {"fail_if_exists": str(marker)}}]
    path = write_scenario(scenario_dict(tiny_model, backends))
    out = tmp_path / "out"
    assert run(path, out, only_backends=["later"], in_process=True, write_report=False) == 1
    assert [c["status"] for c in results(out)["cells"]] == ["failed"]
    # ok now runs; later still failed
    assert run(path, out, only_backends=["ok"], resume=True, in_process=True, write_report=False) == 1
    ok_before = results(out)["cells"][0]
    assert ok_before["backend"] == "ok" and ok_before["status"] == "ok"
    ok_records = (out / "cells" / ok_before["id"] / "requests.jsonl").stat().st_mtime_ns

    marker.unlink()
    assert run(path, out, resume=True, in_process=True, write_report=False) == 0
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


def test_three_repetitions_by_default_fewer_warn(write_scenario, tiny_model):
    from typer.testing import CliRunner

    from harness.cli import app

    data = scenario_dict(tiny_model, [SCRIPTED])
    del data["repetitions"]
    assert load_scenario(write_scenario(data)).repetitions == 3
    r = CliRunner().invoke(app, ["validate", str(write_scenario(data))])
    assert r.exit_code == 0 and "warning" not in r.output
    r = CliRunner().invoke(app, ["validate", str(write_scenario({**data, "repetitions": 2}))])
    assert r.exit_code == 0, r.output
    assert "warning: repetitions: 2: with fewer than 3 repetitions there is no confidence interval across " \
           "repetitions" in " ".join(r.output.split())
    bad = CliRunner().invoke(app, ["validate", str(write_scenario({**data, "max_error_rate": 2}))])
    assert bad.exit_code == 2 and "max_error_rate" in bad.output and "Traceback" not in bad.output


def test_an_in_process_cell_leaves_the_callers_cpus_and_writes_no_report(write_scenario, tiny_model, tmp_path):
    """Runner(in_process=True), the tests' path for scripted cells: the worker pins its threads to the load
    generator's CPU (resources.isolate_client) for good in a process of its own; here the caller gets its CPUs back.
    write_report=False writes results and summary, and no report."""
    cpus = os.sched_getaffinity(0)
    path = write_scenario(scenario_dict(tiny_model, [SCRIPTED]))
    assert run(path, tmp_path / "out", in_process=True, write_report=False) == 0
    cell = results(tmp_path / "out")["cells"][0]
    assert cell["status"] == "ok" and cell["cpu_isolation"]["isolated"] == (len(cpus) >= 2)
    assert os.sched_getaffinity(0) == cpus
    assert (tmp_path / "out" / "summary.md").is_file() and not (tmp_path / "out" / "report.md").exists()
