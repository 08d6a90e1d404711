"""The worker subprocess of one cell: started in a session of its own, its progress lines pumped to the progress
bar, killed with its whole group on timeout, SIGINT or SIGTERM, and whatever servers it left behind reaped after it.

SIGINT (Ctrl-C) and SIGTERM (`timeout`, CI cancellation, `docker stop`) take one path: the first raises Interrupted
in the runner, which stops the worker's group and records the cell in flight as interrupted (exit code 130)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from harness.core.processes import kill_leftover_groups, log_tail, record_group, stop_process_group
from harness.core.redact import Redactor


class Interrupted(Exception):
    """SIGINT or SIGTERM reached the runner."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signal = signal.Signals(signum)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted in the main thread. Only the first: later ones are ignored until the
    block ends, so the cleanup that follows (stopping the worker's group, writing results.json) is not cut short."""
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in handled}

    def handler(signum, frame):
        for s in handled:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    for s in handled:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run_worker(python: Path | None, cell_dir: Path, timeout_s: float, on_request_done: Callable[[], None],
               plan_json: str, redact: Redactor, environment: dict[str, str]) -> tuple[int | str, str]:
    """(exit code, or why it has none; the tail of its log). The worker runs the installed package, or the source
    tree it was started from, with `python -m`: an engine venv (`python:`) has llmbench installed too. It reads its
    plan from its stdin: cell.json has the secrets masked, and so has worker.log, every line of which (stdout and
    stderr, a traceback quoting a token included) passes through `redact`. `environment` (the backend's
    process_environment) is added to this process's for it."""
    log_path = cell_dir / "worker.log"
    argv = [str(python or sys.executable), "-u", "-m", "harness.run.worker", str(cell_dir)]
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True, env={**os.environ, **environment})
        try:
            # Recorded like the servers: a resumed run kills it before reusing the folder, should it outlive this
            # runner.
            record_group(cell_dir, proc.pid, "worker", argv[0])
            try:
                proc.stdin.write(plan_json)
                proc.stdin.close()
            except BrokenPipeError:
                pass  # the worker died at once; its exit code and log say why

            def pump() -> None:
                for line in proc.stdout:
                    if line.startswith("{\"done\""):
                        on_request_done()
                        continue
                    try:
                        log.write(redact(line))
                        log.flush()
                    except OSError:
                        pass  # a full disk: the worker's own writes fail and say so; the pipe is drained still

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            try:
                exit_code: int | str = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                stop_process_group(proc)
                exit_code = f"timed out after {timeout_s:g} s (cell_timeout_s)"
        finally:
            if proc.poll() is None:  # interrupted, or anything else that stops the runner waiting
                stop_process_group(proc)
            # Servers run in sessions of their own: a worker that died without stopping them leaves them here.
            kill_leftover_groups(cell_dir)
        reader.join(timeout=5)
    return exit_code, log_tail(log_path, 25)


def run_here(cell_dir: Path, plan_json: str) -> tuple[int, str]:
    """The worker's job in this process, for tests of the harness with the scripted backend: no worker to start,
    and nothing isolated either (a crash or hang is the caller's), so `bench run` never takes this path."""
    # By name, as the worker's subprocess is: the worker imports the runner's side (through the Ray generators), and
    # an import back would be a circle.
    cell_worker = importlib.import_module("harness.run.worker").CellWorker
    cpus = os.sched_getaffinity(0)
    try:
        report = asyncio.run(cell_worker(cell_dir, plan_json).run())
    finally:
        # What the worker does to its own process for good: it pins its threads (resources.isolate_client) and
        # freezes what exists before its load. The caller's threads get their CPUs back.
        for thread in threading.enumerate():
            with contextlib.suppress(OSError, TypeError):  # a thread that ended meanwhile, or never started
                os.sched_setaffinity(thread.native_id, cpus)
        gc.unfreeze()
    return (0 if report.status == "ok" else 1), report.error or ""


def describe_exit(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (likely out of memory)" if code == -signal.SIGKILL else ""
        return f"the worker was killed by {name}{hint}"
    return f"the worker exited with code {code}"
