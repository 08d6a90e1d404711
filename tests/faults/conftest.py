"""The fault suite (issue 15): each fault reproduced against a real `bench run` process, asserting the cell's status
and reason, a valid results.json, no leftover process of the run, and a --resume that completes.

Leftover processes are found by process group, never by name: `BenchRun` records the group of every process the run
starts (the runner, its workers and the servers they launch, each in a session of its own) while it runs, and after
it ends looks for live members of those groups. Whatever a test leaves, `BenchRun.close` kills those groups only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from harness.records import RunResult, load_run

ROOT = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.faults)


class BenchRun:
    """`bench ARGS...` in a session of its own, with the process groups of everything it starts recorded as it runs."""

    def __init__(self, *args: str, cwd: Path = ROOT, argv_prefix: tuple[str, ...] = (),
                 python: str | None = sys.executable):
        """`argv_prefix` runs first (unshare, say); with python=None it is the whole command."""
        self.log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a run nobody reads yet must never block on it
        argv = [*argv_prefix, *([python, "-m", "harness.cli", *args] if python else [])]
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.groups: set[int] = {self.proc.pid}
        self.peak_rss = 0
        self._done = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(0.05)

    def sample(self) -> None:
        try:
            root = psutil.Process(self.proc.pid)
            kids = root.children(recursive=True)
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
            self.peak_rss = max(self.peak_rss, int(re.search(r"VmHWM:\s+(\d+)", status)[1]) * 1024)
        except (psutil.NoSuchProcess, OSError, TypeError):
            return
        for p in kids:
            try:
                self.groups.add(os.getpgid(p.pid))
            except ProcessLookupError:
                pass

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._done.set()

    @property
    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def leftovers(self) -> list[psutil.Process]:
        """Live processes in any group the run started (zombies count as gone)."""
        left = []
        for p in psutil.process_iter(["status"]):
            try:
                if os.getpgid(p.pid) in self.groups and p.info["status"] != psutil.STATUS_ZOMBIE:
                    left.append(p)
            except ProcessLookupError:
                pass
        return left

    def wait_gone(self, timeout: float) -> list[psutil.Process]:
        """The leftovers still alive after up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def close(self) -> None:
        self._done.set()
        for pgid in self.groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()


@pytest.fixture
def bench():
    """Start `bench` runs; every group they started is killed at the end, whatever the test did."""
    runs: list[BenchRun] = []

    def start(*args: str, **kw) -> BenchRun:
        run = BenchRun(*args, **kw)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.close()


def valid_results(out: Path) -> RunResult:
    """results.json parses, through the one loader every reader uses."""
    return load_run(out / "results.json")


def cells_by_backend(out: Path) -> dict:
    return {c.backend: c for c in valid_results(out).cells}


def wait_for(predicate, timeout: float = 60, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def group_entries(cell_dir: Path) -> list[dict]:
    path = cell_dir / "process_groups.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def private_tmpfs_available() -> bool:
    """Whether `unshare` can mount a tmpfs in a mount namespace of its own here (root, or user namespaces)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True, timeout=20)
    return probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(not private_tmpfs_available(),
                                 reason="needs unshare with a private tmpfs (root or user namespaces)")
