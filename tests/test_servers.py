"""The shared server launcher: readiness, failures with the log, process-group teardown, leftovers of killed workers."""

import json
import signal
import sys
import time

import pytest

from backends.base import BackendError
from harness.core.processes import GROUPS_FILE, kill_leftover_groups, launch


def http_server(port: int) -> list[str]:
    return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]


async def test_launch_waits_for_ready_and_stop_kills_the_group(tmp_path):
    import httpx
    import psutil

    server = await launch("web", http_server, tmp_path, "/", timeout_s=30)
    assert httpx.get(server.url + "/").status_code == 200
    assert json.loads((tmp_path / GROUPS_FILE).read_text())["pgid"] == server.pgid
    pid = server.proc.pid
    server.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not (tmp_path / GROUPS_FILE).exists()


async def test_launch_reports_a_server_that_exits(tmp_path):
    def dies(port: int) -> list[str]:
        return [sys.executable, "-c", "import sys; print('cannot open the model file'); sys.exit(3)"]

    with pytest.raises(BackendError, match="(?s)exited with code 3.*cannot open the model file"):
        await launch("dying", dies, tmp_path, "/", timeout_s=30)
    assert (tmp_path / "dying.log").exists() and not (tmp_path / GROUPS_FILE).exists()


async def test_launch_times_out_and_leaves_nothing(tmp_path):
    import psutil

    def silent(port: int) -> list[str]:  # alive, never listening; with a child in its group
        return [sys.executable, "-c", "import subprocess, sys, time; "
                "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('warming', flush=True); "
                "time.sleep(60)"]

    with pytest.raises(BackendError, match="(?s)not ready after 1 s.*warming"):
        await launch("slow", silent, tmp_path, "/", timeout_s=1)
    time.sleep(0.2)
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if "time.sleep(60)" in " ".join(p.info["cmdline"] or [])
                 and p.status() != psutil.STATUS_ZOMBIE]
    assert not leftovers


async def test_launch_does_not_mistake_another_server_for_its_own(tmp_path, monkeypatch):
    """Another process takes the port between free_port and the bind: its 200 must not count as ours being ready."""
    from harness.core import processes as servers

    foreign = await launch("foreign", http_server, tmp_path, "/", timeout_s=30)
    try:
        monkeypatch.setattr(servers, "free_port", lambda: foreign.port)
        with pytest.raises(BackendError, match="(?s)did not start.*Address already in use"):
            await launch("ours", http_server, tmp_path, "/", timeout_s=30)
    finally:
        foreign.stop()


async def test_leftover_groups_of_a_killed_worker_are_killed(tmp_path):
    server = await launch("web", http_server, tmp_path, "/", timeout_s=30)
    assert kill_leftover_groups(tmp_path) == [server.pgid]  # the worker "died" without calling stop
    server.proc.wait(timeout=10)
    assert server.exited() == -signal.SIGKILL
    assert not (tmp_path / GROUPS_FILE).exists()
    assert kill_leftover_groups(tmp_path) == []
