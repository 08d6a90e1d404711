"""The shared server launcher: readiness, failures with the log, process-group teardown, leftovers of killed workers."""

import json
import os
import signal
import sys
import time

import pytest

from backends.base import BackendError
from harness.core.processes import GROUPS_FILE, container_name, kill_leftover_groups, launch


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


# ---- issue 25: where a server listens, what its log and its record say -----------------------------------------------

LISTENER = """
import http.server, os, socket, sys
host = os.environ.get("HOST", "127.0.0.1")  # as llama_cpp.server and uvicorn do
print("non-default args: {'api_key': '%s'}, token %s" % (sys.argv[2], os.environ.get("HF_TOKEN")), flush=True)
if sys.argv[3] == "extra":  # a second socket, on every interface
    extra = socket.socket(); extra.bind(("0.0.0.0", 0)); extra.listen()
http.server.HTTPServer((host, int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


def listener(secret: str = "none", extra: str = "no", tag: str = ""):
    return lambda port: [sys.executable, "-c", LISTENER, str(port), secret, extra, tag]  # tag: to find it


def listening_addresses(server) -> set[str]:
    import psutil

    return {c.laddr.ip for c in psutil.Process(server.pgid).net_connections("inet") if c.status == psutil.CONN_LISTEN}


async def test_an_inherited_host_variable_cannot_move_the_bind(tmp_path, monkeypatch):
    """With nothing in the scenario, HOST=0.0.0.0 in the environment made llama_cpp.server listen on every
    interface: launch removes the variables servers take their bind from."""
    for name in ("HOST", "PORT", "CONFIG_FILE", "HOSTNAME", "LLAMA_ARG_HOST", "UVICORN_HOST"):
        monkeypatch.setenv(name, "0.0.0.0")
    monkeypatch.setenv("DOCKER_HOST", "unix:///run/user/1/docker.sock")  # where docker is, not where we listen
    server = await launch("web", listener(), tmp_path, "/", timeout_s=30)
    try:
        assert listening_addresses(server) == {"127.0.0.1"}
    finally:
        server.stop()

    from harness.core.processes import server_environment

    env = server_environment({"PORT": "80", "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert not {"HOST", "PORT", "CONFIG_FILE", "HOSTNAME", "LLAMA_ARG_HOST", "UVICORN_HOST"} & set(env)
    assert env["DOCKER_HOST"].startswith("unix://") and env["VLLM_CPU_KVCACHE_SPACE"] == "1"


async def test_a_server_listening_beyond_loopback_is_stopped_and_named(tmp_path):
    import psutil

    with pytest.raises(BackendError, match=r"web listens beyond loopback, on 0\.0\.0\.0:\d+ \(pid \d+ python"):
        await launch("web", listener(extra="extra", tag=str(tmp_path)), tmp_path, "/", timeout_s=30)
    time.sleep(0.2)
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in (p.info["cmdline"] or [])
                and p.status() != psutil.STATUS_ZOMBIE]
    assert not (tmp_path / GROUPS_FILE).exists()


async def test_the_server_log_is_masked_as_it_is_written(tmp_path):
    """vLLM logs its non-default args (an api_key among them) into its log, which the cell folder keeps."""
    server = await launch("web", listener(secret="sk-ArgvSecret123"), tmp_path, "/", timeout_s=30,
                          env={"HF_TOKEN": "hf_EnvironmentSecret456"})
    server.stop()
    log = (tmp_path / "web.log").read_text()
    assert "non-default args: {'api_key': '***'}, token ***" in log
    assert "ArgvSecret" not in log and "EnvironmentSecret" not in log


async def test_the_container_is_removed_however_the_server_ends(tmp_path, monkeypatch):
    """A docker client killed after a timeout left its container running: the container's removal runs on stop, on a
    failed start, and by the runner for a worker that was killed. A stand-in `docker` on PATH notes each removal."""
    done, bin_dir = tmp_path / "cleaned", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(f"#!{sys.executable}\nimport sys\n"
                                    f"assert sys.argv[1:3] == ['rm', '--force']\n"
                                    f"open({str(done)!r}, 'a').write('x')\n")
    (bin_dir / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    container = container_name("web")
    server = await launch("web", http_server, tmp_path, "/", timeout_s=30, container=container)
    server.stop()
    assert done.read_text() == "x"

    def silent(port: int) -> list[str]:
        return [sys.executable, "-c", "import time; time.sleep(60)"]

    with pytest.raises(BackendError, match="not ready"):
        await launch("slow", silent, tmp_path, "/", timeout_s=1, container=container)
    assert done.read_text() == "xx"

    await launch("web", http_server, tmp_path, "/", timeout_s=30, container=container)  # its worker "dies"
    assert json.loads((tmp_path / GROUPS_FILE).read_text())["container"] == container
    assert len(kill_leftover_groups(tmp_path)) == 1 and done.read_text() == "xxx"


def test_a_groups_record_cannot_name_a_command_or_a_container_not_ours(tmp_path, capsys):
    """The record is a file in a folder a resumed run reads: it held a cleanup argv that the runner ran as written.
    Now it names a container only, and only one of ours is removed; any other record is skipped, running nothing."""
    marker = tmp_path / "ran"
    command = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    lines = [{"pgid": 2 ** 22 + 7, "create_time": 1.0, "name": "x", "argv0": "x", "cleanup": command},
             {"pgid": 2 ** 22 + 8, "create_time": 1.0, "name": "x", "argv0": "x", "container": "postgres"},
             {"pgid": 2 ** 22 + 9, "create_time": 1.0, "name": "x", "argv0": "x", "container": ["rm", "-rf", "/"]}]
    (tmp_path / GROUPS_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines))
    from harness.core.processes import read_groups

    assert [e.get("container") for e in read_groups(tmp_path)] == [None]  # the old-style line: its argv ignored
    assert "skipped a damaged line" in capsys.readouterr().err
    kill_leftover_groups(tmp_path)
    assert not marker.exists()


def test_a_damaged_groups_record_is_skipped_with_a_warning(tmp_path, capsys):
    """A partial line made every --resume after it raise a traceback; a pgid of 0 would signal our own group."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        from harness.core.processes import record_group

        record_group(tmp_path, proc.pid, "sleeper", sys.executable)
        with (tmp_path / GROUPS_FILE).open("a") as f:
            f.write('{"pgid": 0, "create_time": null, "name": "x", "argv0": "x"}\n[1, 2]\n{"pgid": 12')
        assert kill_leftover_groups(tmp_path) == [proc.pid]
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    warnings = capsys.readouterr().err
    assert warnings.count("skipped a damaged line") == 3 and GROUPS_FILE in warnings
    assert not (tmp_path / GROUPS_FILE).exists()


def test_server_args_pass_an_allowlist_spelled_in_full():
    from harness.core.processes import check_server_args

    allowed = ("--n_ctx", "--n_gpu_layers", "--verbose", "-c")
    ok = ["--n_ctx", "512", "--n_gpu_layers", "-1", "--verbose", "--n_ctx=8", "-c", "16"]
    assert check_server_args(ok, allowed, "srv") == ok
    for bad in (["--n_ct", "5"], ["--n_ctx", "5", "--host", "0.0.0.0"], ["--hos=0.0.0.0"], ["-h"], ["model.gguf"],
                ["--n_ctx", "--", "--host", "x"]):
        with pytest.raises(ValueError, match="is not a srv option"):
            check_server_args(bad, allowed, "srv")
    # argparse takes a one-dash prefix even with allow_abbrev off: `-m` would be read as `-mg`
    single = ("-mg", "--threads")
    assert check_server_args(["-mg", "0", "--threads", "2"], single, "srv") == ["-mg", "0", "--threads", "2"]
    for bad in (["-m", "x.gguf"], ["-mg0"]):
        with pytest.raises(ValueError, match=f"'{bad[0]}' is not a srv option"):
            check_server_args(bad, single, "srv")
    # an engine that reads no --flag=value (llama.cpp's C++ server) refuses that spelling
    with pytest.raises(ValueError, match="'--threads=2' is not a srv option"):
        check_server_args(["--threads=2"], single, "srv", equals=False)
