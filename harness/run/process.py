"""The worker subprocess of one cell: started in a session of its own, its progress lines pumped to the progress
bar, killed with its whole group on timeout or Ctrl-C, and whatever servers it left behind reaped after it."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from harness.core.processes import kill_leftover_groups, log_tail, stop_process_group


class Interrupted(Exception):
    pass


def run_worker(python: Path | None, cell_dir: Path, timeout_s: float, on_request_done: Callable[[], None]) \
        -> tuple[int | str, str]:
    """(exit code, or why it has none; the tail of its log). The worker runs the installed package, or the source
    tree it was started from, with `python -m`: an engine venv (`python:`) has llmbench installed too."""
    log_path = cell_dir / "worker.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([str(python or sys.executable), "-u", "-m", "harness.run.worker", str(cell_dir)],
                                stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)

        def pump() -> None:
            for line in proc.stdout:
                if line.startswith("{\"done\""):
                    on_request_done()
                else:
                    log.write(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            exit_code: int | str = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_process_group(proc)
            exit_code = f"timed out after {timeout_s:g} s (cell_timeout_s)"
        except KeyboardInterrupt:
            stop_process_group(proc)
            raise Interrupted from None
        finally:
            # Servers run in sessions of their own: a worker that died without stopping them leaves them here.
            kill_leftover_groups(cell_dir)
        reader.join(timeout=5)
    return exit_code, log_tail(log_path, 25)


def describe_exit(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (likely out of memory)" if code == -signal.SIGKILL else ""
        return f"the worker was killed by {name}{hint}"
    return f"the worker exited with code {code}"
