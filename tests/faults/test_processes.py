"""Faults 1 and 2: a runner killed with SIGKILL or stopped with SIGTERM, servers stopped (SIGSTOP) mid-stream,
workers orphaned and frozen, and the --resume that follows."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import scenario_dict
from tests.faults.conftest import cells_by_backend, group_entries, valid_results, wait_for

try:
    import llama_cpp  # noqa: F401
except ImportError:
    llama_cpp = None
needs_llama = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed")

LLAMA_SERVER = {"name": "server", "kind": "llama_cpp", "options": {"mode": "server", "gguf_type": "f32"}}
LONG = [{"name": "long", "input_tokens": 16, "output_tokens": 300, "num_requests": 1, "warmup_requests": 0}]


def server_streaming(cell_dir) -> bool:
    log = cell_dir / "llama_server.log"
    return log.is_file() and "POST /v1/completions" in log.read_text(errors="replace")


def group_of(cell_dir, name: str) -> int:
    return next(e["pgid"] for e in group_entries(cell_dir) if e["name"] == name)


@needs_llama
def test_a_killed_runner_leaves_no_worker_and_no_stopped_server(bench, write_scenario, tiny_model, tmp_path):
    """The issue's reproduction: SIGKILL to `bench run` while its llama.cpp server is SIGSTOPped. The worker sees its
    runner go and stops the server (SIGTERM, then SIGKILL: a stopped process ignores SIGTERM) long before
    cell_timeout_s; --resume then measures the cell."""
    path = write_scenario(scenario_dict(tiny_model, [LLAMA_SERVER], LONG, cell_timeout_s=600))
    out = tmp_path / "out"
    cell_dir = out / "cells" / "tiny__server__long"
    run = bench("run", str(path), "--out", str(out))
    wait_for(lambda: server_streaming(cell_dir), 180, "the server to receive the request")
    os.killpg(group_of(cell_dir, "llama_server"), signal.SIGSTOP)
    run.sample()
    t0 = time.monotonic()
    os.kill(run.proc.pid, signal.SIGKILL)
    assert run.wait(30) == -signal.SIGKILL
    assert not run.wait_gone(20), "the worker and the stopped server must go once the runner is gone"
    assert time.monotonic() - t0 < 25  # the orphan's grace, not cell_timeout_s
    assert valid_results(out).cells == []  # written before the cell started: valid, and nothing half-stored

    again = bench("run", str(path), "--out", str(out), "--resume")
    assert again.wait(300) == 0, again.output
    cell = cells_by_backend(out)["server"]
    assert cell.status == "ok" and cell.metrics.value("completed") == 1
    assert not again.wait_gone(5)


@needs_llama
def test_sigterm_stops_the_worker_and_its_server_and_keeps_results(bench, write_scenario, tiny_model, tmp_path):
    """What `timeout`, CI cancellation and `docker stop` send: the same path as Ctrl-C, exit code 130."""
    path = write_scenario(scenario_dict(tiny_model, [LLAMA_SERVER], LONG))
    out = tmp_path / "out"
    cell_dir = out / "cells" / "tiny__server__long"
    run = bench("run", str(path), "--out", str(out))
    wait_for(lambda: server_streaming(cell_dir), 180, "the server to receive the request")
    run.sample()
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(60) == 130, run.output
    assert not run.wait_gone(5)
    cell = cells_by_backend(out)["server"]
    assert cell.status == "failed" and cell.error == "interrupted by SIGTERM"
    assert "interrupted" in run.output and "SIGTERM" in run.output

    again = bench("run", str(path), "--out", str(out), "--resume")
    assert again.wait(300) == 0, again.output
    assert cells_by_backend(out)["server"].ok


def scripted_hang(marker, **options) -> dict:
    return {"name": "hang", "kind": "scripted",
            "options": {"record_requests": True, "hang_while_exists": str(marker), **options}}


OK = {"name": "ok", "kind": "scripted", "options": {"ttft_s": 0.005, "itl_s": 0.001}}


def test_sigterm_mid_matrix_keeps_the_finished_cells(bench, write_scenario, tiny_model, tmp_path):
    marker = tmp_path / "hang"
    marker.touch()
    path = write_scenario(scenario_dict(tiny_model, [OK, scripted_hang(marker)]))
    out = tmp_path / "out"
    run = bench("run", str(path), "--out", str(out))
    wait_for(lambda: (out / "cells" / "tiny__hang__w" / "seen.jsonl").is_file(), 120, "the hanging request")
    run.sample()
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(60) == 130
    assert not run.wait_gone(5)
    cells = cells_by_backend(out)
    assert cells["ok"].ok and cells["hang"].error == "interrupted by SIGTERM"
    assert run.peak_rss <= 150 * 2**20, f"the runner peaked at {run.peak_rss / 2**20:.0f} MB"

    marker.unlink()
    ok_before = cells["ok"]
    again = bench("run", str(path), "--out", str(out), "--resume")
    assert again.wait(120) == 0, again.output
    cells = cells_by_backend(out)
    assert cells["hang"].ok and cells["ok"] == ok_before  # the finished cell was not measured again


def test_resume_kills_the_groups_a_frozen_orphan_left(bench, write_scenario, tiny_model, tmp_path):
    """A worker that cannot notice its runner died (SIGSTOPped with it) keeps its server: --resume kills every
    group recorded in the cell's process_groups.jsonl before it empties the folder."""
    marker = tmp_path / "hang"
    marker.touch()
    path = write_scenario(scenario_dict(tiny_model, [scripted_hang(marker, server=True)]))
    out = tmp_path / "out"
    cell_dir = out / "cells" / "tiny__hang__w"
    run = bench("run", str(path), "--out", str(out))
    wait_for(lambda: (cell_dir / "seen.jsonl").is_file(), 120, "the hanging request")
    worker, server = group_of(cell_dir, "worker"), group_of(cell_dir, "scripted_server")
    run.sample()
    os.killpg(worker, signal.SIGSTOP)
    os.kill(run.proc.pid, signal.SIGKILL)
    run.wait(30)
    time.sleep(1.0)
    assert {worker, server} <= {os.getpgid(p.pid) for p in run.leftovers()}, "the frozen orphan and its server"

    marker.unlink()
    again = bench("run", str(path), "--out", str(out), "--resume")
    assert again.wait(120) == 0, again.output
    assert not run.wait_gone(5), "--resume must have killed the orphaned worker and its server"
    assert cells_by_backend(out)["hang"].ok
    assert not again.wait_gone(5)


def test_an_orphan_never_writes_into_a_resumed_cell(bench, write_scenario, tiny_model, tmp_path):
    """Even an orphan the resume could not kill (its group was not recorded) writes nothing once it wakes: it sees its
    runner gone and exits, and a cell.json naming another attempt would stop it too (next test)."""
    marker = tmp_path / "hang"
    marker.touch()
    path = write_scenario(scenario_dict(tiny_model, [scripted_hang(marker)]))
    out = tmp_path / "out"
    cell_dir = out / "cells" / "tiny__hang__w"
    run = bench("run", str(path), "--out", str(out))
    wait_for(lambda: (cell_dir / "seen.jsonl").is_file(), 120, "the hanging request")
    worker = group_of(cell_dir, "worker")
    run.sample()
    os.killpg(worker, signal.SIGSTOP)
    os.kill(run.proc.pid, signal.SIGKILL)
    run.wait(30)
    (cell_dir / "process_groups.jsonl").unlink()  # the resume cannot know about it

    marker.unlink()
    again = bench("run", str(path), "--out", str(out), "--resume")
    assert again.wait(120) == 0, again.output
    resumed = {name: (cell_dir / name).read_bytes() for name in ("cell.json", "worker.json", "timeline.json",
                                                                 "requests.jsonl")}
    os.killpg(worker, signal.SIGCONT)
    assert not run.wait_gone(15), "the woken orphan must exit"
    assert {name: (cell_dir / name).read_bytes() for name in resumed} == resumed
    assert cells_by_backend(out)["hang"].ok


def test_a_worker_whose_cell_json_names_another_attempt_writes_nothing(tmp_path, tiny_model):
    """The per-attempt token: a worker checks cell.json before each write into the cell's folder."""
    from harness.config.scenario import Cell
    from harness.core.spec import BackendSpec, Resources
    from harness.records import CellPlan
    from harness.config.scenario import Workload

    plan = CellPlan(cell=Cell(model="tiny", backend="s", workload="w"), backend=BackendSpec(name="s", kind="scripted"),
                    model_name="tiny", model_path=tiny_model, prompts_file=tmp_path / "prompts.json",
                    workload=Workload(name="w", input_tokens=8, output_tokens=2, num_requests=1), repetitions=1,
                    seed=0, record_outputs=False, resources=Resources(), attempt="mine")
    (tmp_path / "cell.json").write_text(plan.model_copy(update={"attempt": "a resumed run's"}).model_dump_json())
    code = ("import sys; from pathlib import Path; from harness.run.worker import CellWorker; "
            "CellWorker(Path(sys.argv[1]), sys.stdin.read()).check_owner(); print('wrote on')")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], input=plan.model_dump_json(), text=True,
                          capture_output=True, timeout=120, start_new_session=True)
    assert done.returncode == -signal.SIGKILL and "wrote on" not in done.stdout  # it killed its own group
    assert "another attempt" in done.stderr
    assert json.loads((tmp_path / "cell.json").read_text())["attempt"] == "a resumed run's"


def test_sigterm_stops_bench_calibrate_and_its_scripted_server(bench, tmp_path):
    """Issue 25: `bench calibrate` left its scripted server running on SIGTERM. Every command that starts a process
    takes SIGTERM as `bench run` does: what it started is stopped, exit code 130."""
    out = tmp_path / "calibrate"
    run = bench("calibrate", "--rate", "5", "--seconds", "30", "--out", str(out))
    wait_for(lambda: any(out.rglob("worker.log")), 120, "the first cell's worker")
    run.sample()  # records the groups of the server and the worker, each in a session of its own
    assert list(out.rglob("scripted_server.log"))
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(60) == 130, run.output
    assert "interrupted" in run.output and "SIGTERM" in run.output
    assert not run.wait_gone(10), "the scripted server and the worker must be gone"
