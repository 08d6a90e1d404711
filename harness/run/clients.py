"""More than one client process for a cell (`load.clients: N`), when one process cannot keep the schedule.

The worker is client 0; it starts clients 1..N-1 (`python -m harness.run.worker CELL_DIR --client K N`), each
attaching a backend of the cell's kind to the engine the worker started (Backend.attach_spec) and sending its
share of every repetition (strategies.ClientShare) on its own connections. Each client stamps with its own monotonic
clock; the worker measures each client's offset at start-up (`measure_offset`) and brings its records onto the cell's
clock (`to_cell_clock`) as they arrive, so the one reducer sees one clock. A version with clients on other machines
(Ray) reuses `measure_offset`, `to_cell_clock` and ClientClock with its own transport.

The protocol, JSON lines (the worker writes a client's stdin and reads its stdout):
    worker → {"plan": the CellPlan, secrets included, "attach": BackendSpec fields}
    client → {"hello": pid};  worker → "ping" × PINGS, client → {"pong": t} each;  worker → "synced"
    client → {"ready": true} | {"failed": why}
    worker → {"go": rep, "t0": start on the client's clock, "connections": n}
    client → one RequestRecord per line as each request ends, then {"finished": rep, "loop_lag_ms": [...]}
    worker → {"stop": true}, or its stdin closes: the client stops its backend and exits.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from harness.core.errors import BackendError
from harness.core.events import now
from harness.records import ClientClock, RequestRecord

PINGS = 50
START_TIMEOUT_S = 300.0
GO_AHEAD_S = 0.1  # how far ahead of a repetition's start its go message is sent


def measure_offset(ping: Callable[[], float], pings: int = PINGS) -> tuple[float, float]:
    """(offset, error) of another clock, from `ping()` returning its reading: NTP's estimate from the fastest round
    trip. The reading was taken between our two stamps, so it is at their midpoint within half the round trip."""
    best: tuple[float, float] | None = None
    for _ in range(pings):
        t1 = now()
        remote = ping()
        t2 = now()
        if best is None or (t2 - t1) / 2 < best[1]:
            best = (remote - (t1 + t2) / 2, (t2 - t1) / 2)
    assert best is not None
    return best


def to_cell_clock(rec: RequestRecord, clock: ClientClock) -> RequestRecord:
    """A record stamped on a client's clock, moved onto the cell's clock and marked with the client."""
    shift = clock.offset_s
    rec.t_send -= shift
    if rec.t_scheduled is not None:
        rec.t_scheduled -= shift
    rec.chunk_times = [t - shift for t in rec.chunk_times]
    rec.client = clock.index
    return rec


# ---- the client's side ----------------------------------------------------------------------------------------------

def client_start(stdin: IO[str], stdout: IO[str]) -> tuple[str, dict[str, Any]]:
    """The client's start: read the plan (JSON) and the attach spec, say hello, then answer the worker's pings with
    this clock's reading until it says "synced"."""
    first = json.loads(stdin.readline())
    print(json.dumps({"hello": os.getpid()}), file=stdout, flush=True)
    for line in stdin:
        if line.strip() != "ping":
            break
        print(json.dumps({"pong": now()}), file=stdout, flush=True)
    return first["plan"], first["attach"]


def read_commands(stdin: IO[str], loop: asyncio.AbstractEventLoop, inbox: asyncio.Queue) -> None:
    """In a thread: the worker's commands, as dicts, into `inbox`; None when its pipe closes."""
    for line in stdin:
        loop.call_soon_threadsafe(inbox.put_nowait, json.loads(line))
    loop.call_soon_threadsafe(inbox.put_nowait, None)


# ---- the worker's side --------------------------------------------------------------------------------------------

class ClientProcesses:
    """Clients 1..count-1 of a cell, driven from the worker. `forward(record)` is called, from a reader thread,
    with each of their records already on the cell's clock (the worker writes it and counts it for progress)."""

    def __init__(self, cell_dir: Path, count: int, plan_json: str, attach: dict[str, Any],
                 forward: Callable[[RequestRecord], None]):
        self.cell_dir, self.count, self.forward = cell_dir, count, forward
        self.start_line = json.dumps({"plan": plan_json, "attach": attach}) + "\n"
        self.procs: list[subprocess.Popen] = []
        self.clocks: list[ClientClock] = []
        self.inboxes: list[asyncio.Queue] = []
        self.records: list[list[RequestRecord]] = []

    async def start(self) -> list[ClientClock]:
        """Start the clients, measure their clocks, and wait until each has its backend attached."""
        loop = asyncio.get_running_loop()
        for k in range(1, self.count):
            self.procs.append(subprocess.Popen(
                [sys.executable, "-u", "-m", "harness.run.worker", str(self.cell_dir), "--client", str(k),
                 str(self.count)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1))
        self.clocks = await asyncio.to_thread(lambda: [self._sync(k + 1, p) for k, p in enumerate(self.procs)])
        for clock, proc in zip(self.clocks, self.procs):
            self.inboxes.append(asyncio.Queue())
            self.records.append([])
            threading.Thread(target=self._read, args=(loop, clock, proc), daemon=True).start()
        for k, inbox in enumerate(self.inboxes):
            try:
                msg = await asyncio.wait_for(inbox.get(), START_TIMEOUT_S)
            except TimeoutError:
                raise BackendError(f"load.clients: client {k + 1} was not ready after {START_TIMEOUT_S:g} s") from None
            if not msg.get("ready"):
                raise BackendError(f"load.clients: client {k + 1} could not start: {msg.get('failed')}")
        return self.clocks

    def _sync(self, index: int, proc: subprocess.Popen) -> ClientClock:
        try:
            proc.stdin.write(self.start_line)
            proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died at once: said below
        hello = proc.stdout.readline()
        if not hello:
            raise BackendError(f"load.clients: client {index} exited at start (code {proc.wait()}; see worker.log)")

        def ping() -> float:
            proc.stdin.write("ping\n")
            proc.stdin.flush()
            return json.loads(proc.stdout.readline())["pong"]

        offset, error = measure_offset(ping)
        proc.stdin.write("synced\n")
        proc.stdin.flush()
        return ClientClock(index=index, pid=json.loads(hello)["hello"], offset_s=offset, offset_error_s=error)

    def _read(self, loop: asyncio.AbstractEventLoop, clock: ClientClock, proc: subprocess.Popen) -> None:
        slot = clock.index - 1
        for line in proc.stdout:
            msg = json.loads(line)
            if "t_send" in msg:
                rec = to_cell_clock(RequestRecord.from_dict(msg), clock)
                self.records[slot].append(rec)
                self.forward(rec)
            else:
                loop.call_soon_threadsafe(self.inboxes[slot].put_nowait, msg)
        code = proc.wait()
        loop.call_soon_threadsafe(self.inboxes[slot].put_nowait,
                                  {"failed": f"client {clock.index} exited (code {code}; see worker.log)"})

    def go(self, rep: int, t0: float, connections: list[int]) -> None:
        """Start repetition `rep` at t0 on the cell's clock (each client gets it on its own)."""
        for clock, proc, n in zip(self.clocks, self.procs, connections):
            proc.stdin.write(json.dumps({"go": rep, "t0": t0 + clock.offset_s, "connections": n}) + "\n")
            proc.stdin.flush()

    async def finished(self, rep: int) -> tuple[list[RequestRecord], list[float]]:
        """Every client's records of repetition `rep` (on the cell's clock) and their loop-lag samples."""
        records, lags = [], []
        for slot, inbox in enumerate(self.inboxes):
            msg = await inbox.get()
            if msg.get("finished") != rep:
                raise BackendError(f"load.clients: client {slot + 1} failed: {msg.get('failed', msg)}")
            lags += msg["loop_lag_ms"]
            # The pipe is in order: every record of the repetition was read before its "finished".
            records += self.records[slot]
            self.records[slot] = []
        return records, lags

    def stop(self) -> None:
        for proc in self.procs:
            try:
                proc.stdin.write(json.dumps({"stop": True}) + "\n")
                proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
