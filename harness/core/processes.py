"""Processes the harness starts, written once for every served engine (llama.cpp, vLLM, TGI, our own).

`launch` picks a free port on 127.0.0.1, starts the server (an argv list, never a shell) in its own session with its
output in a log file in the cell's folder, and polls a readiness URL until it answers 200 from a port the launched
process tree listens on, while checking that the process is still alive; any failure raises BackendError with the
tail of the log and leaves no process behind.
`Server.stop` tears down the whole process group, SIGTERM first, SIGKILL after a grace period.

Every launched group is also recorded in the cell's `process_groups.jsonl` (removed again on a clean stop), so that
the runner can kill what a worker left behind when the worker itself was killed (`kill_leftover_groups`). The runner
records the worker's own group there too, and kills whatever is listed again before a resumed run reuses the folder;
a worker whose runner is gone stops what it launched itself (`stop_launched`).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.core.errors import BackendError

GROUPS_FILE = "process_groups.jsonl"


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop proc and every child it started (it must run in its own session: start_new_session=True)."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        _signal_group(proc.pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once it runs again
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    # Children may outlive a leader that already exited: the group is killed either way.
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def refuse_listen_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """For a validator of extra server argv: `launch` serves on 127.0.0.1 at a port it picks, so flags that choose
    where a server listens (`--host 0.0.0.0`, `--port=80`) are refused. Raises ValueError naming them."""
    given = [a for a in argv if a.split("=", 1)[0] in flags]
    if given:
        raise ValueError(f"{', '.join(given)} cannot be set here: the harness serves on 127.0.0.1 at a port it picks")
    return argv


def log_tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file, or "" when it cannot be read."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def free_port() -> int:
    """A port nobody listens on now. Another process could take it before the server binds it: `launch` then waits
    for the port to be its server's, and reports the log of a server that died failing to bind."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    port: int
    log_path: Path
    cell_dir: Path

    @property
    def pgid(self) -> int:
        return self.proc.pid  # start_new_session makes the leader's pid the group id

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def exited(self) -> int | None:
        """The exit code once the server has died (negative: killed by that signal), else None."""
        return self.proc.poll()

    def wait_exit(self, timeout_s: float) -> int | None:
        """The exit code if the server exits within timeout_s, else None."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def exit_reason(self) -> str | None:
        """None while the server runs; once it died, a first line naming how ("llama_server exited (SIGKILL)")
        and the tail of its log after it."""
        code = self.exited()
        if code is None:
            return None
        how = signal.Signals(-code).name if code < 0 else f"code {code}"
        return f"{self.name} exited ({how})\nlast lines of {self.log_path}:\n{self.log_tail()}"

    def died_message(self) -> str:
        code = self.exited()
        how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited with code {code}"
        return f"{self.name} {how}; last lines of {self.log_path}:\n{self.log_tail()}"

    def stop(self, grace_s: float = 10.0) -> None:
        stop_process_group(self.proc, grace_s)
        _launched.pop(self.pgid, None)
        _forget_group(self.cell_dir, self.pgid)


# The servers this process launched and has not stopped yet, for a worker whose runner is gone: it stops them
# without touching the cell's files, which a resumed run may own by then.
_launched: dict[int, subprocess.Popen] = {}


def stop_launched(grace_s: float) -> None:
    """Stop every server group this process launched and has not stopped (SIGTERM, SIGKILL after grace_s)."""
    for proc in list(_launched.values()):
        stop_process_group(proc, grace_s)


async def launch(name: str, argv_for_port: Callable[[int], list[str]], cell_dir: Path, ready_path: str,
                 timeout_s: float, env: dict[str, str] | None = None, ready: Callable[[int, str], bool] | None = None,
                 poll_s: float = 0.25) -> Server:
    """Start `argv_for_port(port)` and wait until GET http://127.0.0.1:port{ready_path} answers 200 (or `ready(status,
    body)` says so). Output goes to CELL_DIR/NAME.log; `env` is added to this process's environment."""
    import httpx

    port = free_port()
    argv = argv_for_port(port)
    log_path = cell_dir / f"{name}.log"
    with log_path.open("wb") as log:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})}, start_new_session=True)
        except OSError as e:
            raise BackendError(f"cannot start {name} ({argv[0]}): {e}") from None
    server = Server(name, proc, port, log_path, cell_dir)
    _launched[server.pgid] = proc
    record_group(cell_dir, server.pgid, name, argv[0])
    deadline = time.monotonic() + timeout_s
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0)) as client:
            while True:
                if server.exited() is not None:
                    raise BackendError(f"{name} did not start: {server.died_message()}")
                try:
                    r = await client.get(server.url + ready_path)
                    # Another process may have taken the port between free_port and the bind: only ours counts.
                    if (ready or _status_ok)(r.status_code, r.text) and _listens(server.proc.pid, port):
                        return server
                except httpx.TransportError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise BackendError(f"{name} was not ready after {timeout_s:g} s (GET {ready_path}); "
                                       f"last lines of {log_path}:\n{server.log_tail()}")
                await asyncio.sleep(poll_s)
    except BaseException:
        # A timeout, a dead server or the worker being interrupted: nothing may outlive the launch. Stopped
        # synchronously, because an await here could itself be cancelled.
        server.stop(grace_s=5.0)
        raise


def _status_ok(status: int, body: str) -> bool:
    return status == 200


def _listens(pid: int, port: int) -> bool:
    """Whether the process or one of its descendants listens on the port."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for proc in procs:
        try:
            conns = proc.net_connections(kind="tcp") if hasattr(proc, "net_connections") else proc.connections("tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns):
            return True
    return False


# ---- the record of launched groups, for cleaning up after a killed worker ------------------------------------------

def record_group(cell_dir: Path, pgid: int, name: str, argv0: str) -> None:
    """Add a process group (its leader's pid, in a session of its own) to the cell's record: the runner kills what
    is recorded there after the worker ends, and before the cell's folder is used again."""
    try:
        created = _create_time(pgid)
    except ProcessLookupError:
        created = None
    with (cell_dir / GROUPS_FILE).open("a") as f:
        f.write(json.dumps({"pgid": pgid, "create_time": created, "name": name, "argv0": argv0}) + "\n")


def _forget_group(cell_dir: Path, pgid: int) -> None:
    path = cell_dir / GROUPS_FILE
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["pgid"] != pgid]
        if keep:
            path.write_text("".join(line + "\n" for line in keep))
        else:
            path.unlink()


def _create_time(pid: int) -> float:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        raise ProcessLookupError(pid) from None


def kill_leftover_groups(cell_dir: Path) -> list[int]:
    """SIGKILL the process groups a worker recorded and never stopped; returns the groups signalled.

    A pid cannot be reused while it still names a live process group, so a group whose leader is gone but which still
    has members is ours; a live leader must also have the recorded start time (otherwise the pid was reused)."""
    path = cell_dir / GROUPS_FILE
    if not path.is_file():
        return []
    killed = []
    for line in path.read_text().splitlines():
        if not line:
            continue
        entry = json.loads(line)
        pgid = entry["pgid"]
        try:
            if entry["create_time"] is not None and abs(_create_time(pgid) - entry["create_time"]) > 0.01:
                continue  # the pid now belongs to another process
        except ProcessLookupError:
            pass  # the leader is gone; its group may still have members
        try:
            os.killpg(pgid, signal.SIGKILL)
            killed.append(pgid)
        except (ProcessLookupError, PermissionError):
            pass
    path.unlink()
    return killed
