"""Processes the harness starts, written once for every served engine (llama.cpp, vLLM, TGI, our own).

`launch` picks a free port on 127.0.0.1, starts the server (an argv list, never a shell) in its own session, with
the variables that could move its bind (HOST, PORT, CONFIG_FILE, ...) removed from its environment and its output
masked (harness/core/redact.py) into a log file in the cell's folder, and polls a readiness URL until it answers 200
from a port the launched process tree listens on, while checking that the process is still alive. Once ready, no
process of its group may listen beyond loopback (psutil), or it is stopped. Any failure raises BackendError with the
tail of the log and leaves no process behind.
`Server.stop` tears down the whole process group, SIGTERM first, SIGKILL after a grace period, then removes the
server's docker container, if it has one (`docker rm --force NAME`: a container outlives the docker client that
started it). Only the container's name is recorded, and only a name of ours (`llmbench-...`) is ever removed: the
record is a file in a folder a resumed run reads, so it must not be able to name a command.
`check_server_args` is the allowlist through which a backend takes extra server flags from a scenario.

Every launched group is also recorded in the cell's `process_groups.jsonl` (rewritten atomically; removed again on a
clean stop), so that the runner can kill what a worker left behind when the worker itself was killed
(`kill_leftover_groups`, which skips a damaged line with a warning). The runner
records the worker's own group there too, and kills whatever is listed again before a resumed run reuses the folder;
a worker whose runner is gone stops what it launched itself (`stop_launched`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from harness.core.errors import BackendError
from harness.core.files import atomic_write
from harness.core.redact import Redactor

GROUPS_FILE = "process_groups.jsonl"
# Variables servers read their bind from: uvicorn under llama_cpp.server (HOST, PORT, or a CONFIG_FILE naming
# them), llama.cpp's llama-server (LLAMA_ARG_HOST, LLAMA_ARG_PORT), TGI's launcher (HOSTNAME, PORT).
LISTEN_VARIABLES = re.compile(r"HOST|PORT|HOSTNAME|CONFIG_FILE|LLAMA_ARG_HOST|LLAMA_ARG_PORT|UVICORN_.*")


def stop_process_group(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
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


def check_server_args(argv: list[str], allowed: Iterable[str], engine: str, equals: bool = True) -> list[str]:
    """For a validator of extra server argv: every option in argv must be one of `allowed` (`--flag`, `-f`), spelled
    exactly, as `--flag value...`, a bare `--flag` or, where the engine takes it (`equals`), `--flag=value`. Every
    token starting with '-' (but a negative number) is compared with the list as written: argparse would take an
    abbreviation (`--hos` for --host, `-m` for `-mg`, even with allow_abbrev off for one dash). What parses also passes
    a parser that knows those flags only, so `--config_file` and the like get no further. Returns argv; raises
    ValueError naming the first argument refused."""
    allowed = list(allowed)
    parser = argparse.ArgumentParser(prog=engine, add_help=False, allow_abbrev=False, exit_on_error=False)
    for flag in allowed:
        parser.add_argument(flag, nargs="*")
    refused = [a for a in argv if a.startswith("-") and not re.fullmatch(r"-\d+(\.\d+)?", a)
               and (a.partition("=")[0] if equals else a) not in allowed]
    if not refused:
        try:
            _, refused = parser.parse_known_args(list(argv))
        except argparse.ArgumentError as e:
            refused = [str(e)]
    if refused:
        raise ValueError(f"{refused[0]!r:.80} is not a {engine} option the harness passes on, spelled in full "
                         f"(allowed: {', '.join(sorted(allowed))}); where the server listens is the harness's: "
                         f"127.0.0.1 at a port it picks")
    return list(argv)


def secrets_to_environment(argv: list[str], variables: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """argv less the flags of `variables` (flag: the variable the server also reads it from) and their values, and
    those values as variables: every local user can read a command line (/proc/PID/cmdline), only its owner a
    process's environment. `--flag value` and `--flag=value` alike."""
    kept: list[str] = []
    env: dict[str, str] = {}
    args = iter(argv)
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag in variables:
            env[variables[flag]] = value if eq else next(args, "")
        else:
            kept.append(arg)
    return kept, env


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
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    cell_dir: Path
    container: str | None = None  # a docker container of ours, removed after the group is stopped
    log_pump: threading.Thread | None = field(default=None, repr=False)

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
        if self.log_pump is not None and self.exited() is not None:
            self.log_pump.join(timeout=2.0)  # a dead server's last lines are still on their way into the log
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
        self.halt(grace_s)
        _forget_group(self.cell_dir, self.pgid)

    def halt(self, grace_s: float) -> None:
        """Stop the group and remove its container, touching none of the cell's files."""
        stop_process_group(self.proc, grace_s)
        remove_container(self.container)
        _launched.pop(self.pgid, None)
        if self.log_pump is not None:
            self.log_pump.join(timeout=5.0)


CONTAINER = re.compile(r"llmbench-[a-z][a-z0-9_.-]*")  # what container_name makes, and all remove_container removes


def container_name(engine: str) -> str:
    """A fresh name for a container the harness starts (`docker run --name`), one remove_container accepts."""
    return f"llmbench-{engine}-{uuid.uuid4().hex[:12]}"


def remove_container(name: str | None) -> None:
    """`docker rm --force NAME` for a container of ours; its failure (no docker any more, a container already gone)
    changes nothing."""
    if name is None or not CONTAINER.fullmatch(name):
        return
    try:
        subprocess.run(["docker", "rm", "--force", name], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        pass


# The servers this process launched and has not stopped yet, for a worker whose runner is gone: it stops them
# without touching the cell's files, which a resumed run may own by then.
_launched: dict[int, Server] = {}


def stop_launched(grace_s: float) -> None:
    """Stop every server group this process launched and has not stopped (SIGTERM, SIGKILL after grace_s)."""
    for server in list(_launched.values()):
        server.halt(grace_s)


def server_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment less the variables that could move a server's bind (LISTEN_VARIABLES), plus
    `env` (the backend's own, checked the same way)."""
    merged = {**os.environ, **(env or {})}
    return {k: v for k, v in merged.items() if not LISTEN_VARIABLES.fullmatch(k.upper())}


async def launch(name: str, argv_for_port: Callable[[int], list[str]], cell_dir: Path, ready_path: str,
                 timeout_s: float, env: dict[str, str] | None = None, ready: Callable[[int, str], bool] | None = None,
                 poll_s: float = 0.25, container: str | None = None) -> Server:
    """Start `argv_for_port(port)` and wait until GET http://127.0.0.1:port{ready_path} answers 200 (or `ready(status,
    body)` says so), then check that nothing of it listens beyond loopback. Output goes, masked, to
    CELL_DIR/NAME.log; `env` is added to this process's environment (server_environment). `container`: the argv is a
    docker client running the container of that name (container_name): it is removed after the group is stopped,
    however it is stopped (a worker killed too: it is recorded with the group), and its port is bound by docker's
    proxy, outside the launched tree (the argv names 127.0.0.1, and a port taken meanwhile makes the client exit),
    so readiness cannot ask which process listens."""
    import httpx

    port = free_port()
    argv = argv_for_port(port)
    log_path = cell_dir / f"{name}.log"
    server_env = server_environment(env)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=server_env, start_new_session=True)
    except OSError as e:
        raise BackendError(f"cannot start {name} ({argv[0]}): {e}") from None
    server = Server(name, proc, port, log_path, cell_dir, container)
    _launched[server.pgid] = server
    try:
        assert proc.stdout is not None  # stdout=PIPE
        server.log_pump = _masked_log(proc.stdout, log_path.open("wb"), Redactor({"argv": argv}, environ=server_env))
        record_group(cell_dir, server.pgid, name, argv[0], container)
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0)) as client:
            while True:
                if server.exited() is not None:
                    raise BackendError(f"{name} did not start: {server.died_message()}")
                try:
                    r = await client.get(server.url + ready_path)
                    # Another process may have taken the port between free_port and the bind: only ours counts.
                    if (ready or _status_ok)(r.status_code, r.text) and (container or _listens(server.proc.pid, port)):
                        break
                except httpx.TransportError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise BackendError(f"{name} was not ready after {timeout_s:g} s (GET {ready_path}); "
                                       f"last lines of {log_path}:\n{server.log_tail()}")
                await asyncio.sleep(poll_s)
        beyond = listening_beyond_loopback(server.pgid)
        if beyond:
            raise BackendError(f"{name} listens beyond loopback, on {', '.join(beyond)}: stopped, the harness serves "
                               f"on 127.0.0.1 only (look at the server's arguments, its config files and the "
                               f"environment; {name}.log may say where it took the address from)")
        return server
    except BaseException:
        # A timeout, a dead server or the worker being interrupted: nothing may outlive the launch. Stopped
        # synchronously, because an await here could itself be cancelled.
        server.stop(grace_s=5.0)
        raise


def _masked_log(pipe: IO[bytes], log: IO[bytes], redact: Redactor) -> threading.Thread:
    """Copy the server's output into its log line by line, each through the Redactor (secrets the server prints,
    vLLM's non-default args say, never reach the file). The pipe is drained to its end even when the log cannot be
    written (a full disk), so the server never blocks on its output."""

    def pump() -> None:
        with pipe, log:
            for line in iter(pipe.readline, b""):
                try:
                    log.write(redact(line.decode(errors="replace")).encode())
                    log.flush()
                except OSError:
                    pass

    thread = threading.Thread(target=pump, name="server-log", daemon=True)
    thread.start()
    return thread


def _status_ok(status: int, body: str) -> bool:
    return status == 200


def _group_processes(pgid: int) -> list[Any]:
    """The live processes of a process group, and the descendants of its leader (which could have left it)."""
    import psutil

    procs = {}
    try:
        leader = psutil.Process(pgid)
        procs = {p.pid: p for p in [leader, *leader.children(recursive=True)]}
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                procs.setdefault(p.pid, p)
        except (ProcessLookupError, PermissionError):
            continue
    return list(procs.values())


def _connections(proc: Any) -> list[Any]:
    import psutil

    try:
        return list(proc.net_connections(kind="inet") if hasattr(proc, "net_connections") else proc.connections("inet"))
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def _listens(pid: int, port: int) -> bool:
    """Whether the process or one of its descendants listens on the port."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
               for proc in procs for c in _connections(proc))


def listening_beyond_loopback(pgid: int) -> list[str]:
    """Where processes of the group listen, or wait for datagrams, on an address other than loopback: "0.0.0.0:8080
    (pid 12 python3)" each."""
    import psutil

    found = []
    for proc in _group_processes(pgid):
        for c in _connections(proc):
            listening = c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr)
            if listening and c.laddr and not _is_loopback(c.laddr.ip):
                try:
                    who = proc.name()
                except psutil.Error:
                    who = "?"
                found.append(f"{c.laddr.ip}:{c.laddr.port} (pid {proc.pid} {who})")
    return found


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


# ---- the record of launched groups, for cleaning up after a killed worker ------------------------------------------

def record_group(cell_dir: Path, pgid: int, name: str, argv0: str, container: str | None = None) -> None:
    """Add a process group (its leader's pid, in a session of its own) to the cell's record: the runner kills what
    is recorded there after the worker ends, and before the cell's folder is used again, and removes its container."""
    try:
        created = _create_time(pgid)
    except ProcessLookupError:
        created = None
    entry = {"pgid": pgid, "create_time": created, "name": name, "argv0": argv0}
    with _locked(cell_dir):
        _write_groups(cell_dir, [*read_groups(cell_dir), entry | ({"container": container} if container else {})])


def _forget_group(cell_dir: Path, pgid: int) -> None:
    with _locked(cell_dir):
        _write_groups(cell_dir, [e for e in read_groups(cell_dir) if e["pgid"] != pgid])


@contextlib.contextmanager
def _locked(cell_dir: Path) -> Iterator[None]:
    """The runner and its worker both rewrite the record: one at a time (a lock on the cell's folder), or one of
    them would write back a copy without the other's entry."""
    fd = os.open(cell_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_groups(cell_dir: Path, entries: list[dict[str, Any]]) -> None:
    path = cell_dir / GROUPS_FILE
    if entries:
        atomic_write(path, "".join(json.dumps(e) + "\n" for e in entries))
    else:
        path.unlink(missing_ok=True)


def read_groups(cell_dir: Path) -> list[dict[str, Any]]:
    """The recorded groups; a line that is not a whole record (a crash mid-write of an older version, a disk error)
    is skipped with a warning on stderr, never trusted: a pgid of 0 or 1 would signal this process's group or every
    process."""
    path = cell_dir / GROUPS_FILE
    try:
        lines = path.read_bytes().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    except OSError as e:
        print(f"warning: {path}: cannot read it ({e.strerror or e}): its process groups are not cleaned up",
              file=sys.stderr)
        return []
    entries = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            valid = (isinstance(entry, dict) and type(entry.get("pgid")) is int and entry["pgid"] > 1
                     and isinstance(entry.get("create_time"), (int, float, type(None)))
                     and _is_container(entry.get("container")))
        except ValueError:
            valid = False
        if valid:
            entries.append(entry)
        else:
            print(f"warning: {path}:{n}: skipped a damaged line ({line[:80]!r})", file=sys.stderr)
    return entries


def _is_container(value: Any) -> bool:
    """None, or the name of a container of ours: a record naming anything else is not one we wrote."""
    return value is None or (isinstance(value, str) and CONTAINER.fullmatch(value) is not None)


def _create_time(pid: int) -> float:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.NoSuchProcess:
        raise ProcessLookupError(pid) from None


def kill_leftover_groups(cell_dir: Path) -> list[int]:
    """SIGKILL the process groups a worker recorded and never stopped, and remove their containers; returns the
    groups signalled.

    A pid cannot be reused while it still names a live process group, so a group whose leader is gone but which still
    has members is ours; a live leader must also have the recorded start time (otherwise the pid was reused)."""
    path = cell_dir / GROUPS_FILE
    if not path.is_file():
        return []
    killed = []
    with _locked(cell_dir):
        entries = read_groups(cell_dir)
        path.unlink(missing_ok=True)
    for entry in entries:
        pgid, created = entry["pgid"], entry.get("create_time")
        if pgid == os.getpgrp():
            continue  # never this process's own group, whatever the record says
        try:
            ours = created is None or abs(_create_time(pgid) - created) <= 0.01  # else the pid was reused
        except ProcessLookupError:
            ours = True  # the leader is gone; its group may still have members
        if ours:
            try:
                os.killpg(pgid, signal.SIGKILL)
                killed.append(pgid)
            except (ProcessLookupError, PermissionError):
                pass
        remove_container(entry.get("container"))  # a named container is ours whatever became of the client's pid
    return killed
