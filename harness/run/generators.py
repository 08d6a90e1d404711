"""`load.generators: N`: the cell's worker and N - 1 Ray actors share one Poisson schedule, when one machine's client
cannot offer the rate a big server takes. The same protocol as `load.clients` (harness/run/clients.py), with Ray as
the transport: each actor runs a ClientWorker (harness/run/worker.py), which attaches a backend to the engine the
worker started and sends its ClientShare of each repetition; it stamps with its own monotonic clock, whose offset the
worker measures at start-up (`measure_offset`, over Ray calls) and removes from its records (`to_cell_clock`), so the
one reducer sees one clock. Records come back when a repetition ends.

The worker joins the cluster named by RAY_ADDRESS (set for it by --executor ray; else a local Ray is started).
The engine must be reachable from the actors' nodes: a server the worker launched listens on 127.0.0.1, so its
generators must share its node (client_placement); a `url:` backend can be driven from anywhere."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.core.errors import BackendError
from harness.core.events import now
from harness.core.spec import Placement
from harness.records import CellPlan, ClientClock, RequestRecord
from harness.run.clients import START_TIMEOUT_S, measure_offset, to_cell_clock
from harness.run.strategies import ClientShare
from harness.run.ray_executor import connect, import_ray, placement_options


# The client the actors run, by name: the worker imports this module (an import back would be a circle), and in the
# worker's process its module is __main__, whose classes Ray cannot send to another process.
CLIENT = ("harness.run.worker", "ClientWorker")


class GeneratorActor:
    """A Ray actor: one generator of a cell, the worker's ClientWorker, driven through its command queue as a client
    process is through its stdin."""

    def __init__(self, index: int, count: int, plan_json: str, attach: dict[str, Any], prompts: bytes):
        client_cls = getattr(importlib.import_module(CLIENT[0]), CLIENT[1])
        # The worker's prompts file is on its node: this actor gets its content, and a folder of its own.
        self.dir = Path(tempfile.mkdtemp(prefix="llmbench-generator-"))
        (self.dir / "prompts.json").write_bytes(prompts)
        plan = CellPlan.model_validate_json(plan_json).model_copy(update={"prompts_file": self.dir / "prompts.json"})
        self.cell = client_cls(self.dir, ClientShare(index, count), plan.model_dump_json(), attach)
        self.inbox: asyncio.Queue | None = None
        self.outbox: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None

    async def now(self) -> float:
        return now()

    async def start(self) -> dict[str, Any]:
        """Attach the backend: {"ready": true, "pid": ..., "node": ...} or {"failed": why}."""
        import ray

        loop = asyncio.get_running_loop()
        self.inbox, self.outbox = asyncio.Queue(), asyncio.Queue()
        self.task = loop.create_task(self.cell.serve(
            self.inbox, lambda line: loop.call_soon_threadsafe(self.outbox.put_nowait, line)))
        return json.loads(await self.outbox.get()) | {"pid": os.getpid(),
                                                      "node": ray.get_runtime_context().get_node_id()}

    async def run(self, rep: int, t0: float, connections: int) -> tuple[list[str], dict[str, Any]]:
        """Repetition `rep` from t0 (on this actor's clock): its records (JSON lines) and how it ended."""
        self.inbox.put_nowait({"go": rep, "t0": t0, "connections": connections})
        records = []
        while True:
            line = await self.outbox.get()
            msg = json.loads(line)
            if "t_send" not in msg:
                return records, msg
            records.append(line)

    async def stop(self) -> None:
        self.inbox.put_nowait(None)
        await self.task
        shutil.rmtree(self.dir, ignore_errors=True)


class RayGenerators:
    """Generators 1..count-1 of a cell, driven from the worker (generator 0), as ClientProcesses drives client
    processes: start(), go(), finished(), stop(). `forward(record)` gets each of their records on the cell's clock."""

    def __init__(self, count: int, plan_json: str, attach: dict[str, Any], forward: Callable[[RequestRecord], None],
                 placement: Placement):
        self.count, self.plan_json, self.attach = count, plan_json, attach
        self.forward, self.placement = forward, placement
        self.actors: list = []
        self.clocks: list[ClientClock] = []
        self.runs: list = []
        self.ray = None
        self.connected = False

    async def start(self) -> list[ClientClock]:
        return await asyncio.to_thread(self._start)

    def _start(self) -> list[ClientClock]:
        ray = self.ray = import_ray()
        self.connected = connect(ray, None)
        prompts = CellPlan.model_validate_json(self.plan_json).prompts_file.read_bytes()
        actor = ray.remote(GeneratorActor).options(**placement_options(self.placement))
        self.actors = [actor.remote(k, self.count, self.plan_json, self.attach, prompts)
                       for k in range(1, self.count)]
        # Started first, all at once: the clocks are then measured on actors that are up.
        try:
            started = ray.get([a.start.remote() for a in self.actors], timeout=START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise BackendError(f"load.generators: the generators were not up after {START_TIMEOUT_S:g} s: does a "
                               f"node of the cluster offer client_placement ({self.placement.model_dump()})?") from None
        for k, (a, hello) in enumerate(zip(self.actors, started), start=1):
            if not hello.get("ready"):
                raise BackendError(f"load.generators: generator {k} could not start: {hello.get('failed')}")
            offset, error = measure_offset(lambda a=a: ray.get(a.now.remote()))
            self.clocks.append(ClientClock(index=k, pid=hello["pid"], offset_s=offset, offset_error_s=error,
                                           node=hello["node"]))
        return self.clocks

    def go(self, rep: int, t0: float, connections: list[int]) -> None:
        """Start repetition `rep` at t0 on the cell's clock (each generator gets it on its own)."""
        self.runs = [a.run.remote(rep, t0 + clock.offset_s, n)
                     for a, clock, n in zip(self.actors, self.clocks, connections)]

    async def finished(self, rep: int) -> tuple[list[RequestRecord], list[float]]:
        """Every generator's records of repetition `rep` (on the cell's clock) and their loop-lag samples."""
        records, lags = [], []
        for clock, (lines, end) in zip(self.clocks, await asyncio.gather(*self.runs)):
            if end.get("finished") != rep:
                raise BackendError(f"load.generators: generator {clock.index} failed: {end.get('failed', end)}")
            lags += end["loop_lag_ms"]
            for line in lines:
                rec = to_cell_clock(RequestRecord.from_dict(json.loads(line)), clock)
                self.forward(rec)
                records.append(rec)
        return records, lags

    def stop(self) -> None:
        if self.ray is None:
            return
        try:
            self.ray.get([a.stop.remote() for a in self.actors], timeout=30)
        except Exception:  # a generator that died has nothing left to stop; it is killed below all the same
            pass
        for a in self.actors:
            self.ray.kill(a)
        if self.connected:
            self.ray.shutdown()
