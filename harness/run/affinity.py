"""CPU isolation of the load generator (`resources.isolate_client`): on a machine with few cores the engine's server
and the worker's event loop fight for the same CPUs, and the loop stamps tokens late. The worker gives its load
generator its own CPU(s) and the engine the rest, with os.sched_setaffinity, in two steps:

- `engine_phase`, before the backend starts: the worker's main thread takes the engine's CPUs, so what the backend
  starts from it inherits them (a launched server's process group, an in-process engine's thread: EngineThread,
  own_engine's serving loop), and the event loop's default executor (asyncio.to_thread) runs on them, whenever its
  threads are made;
- `client_phase`, once the engine is up: the main thread (the event loop) and the threads that were there before
  the engine (the resource monitor) move to the client's CPUs; what the loop starts later (the record writer, the
  loop-lag probe, load.clients' processes) inherits them.

Linux's sched_setaffinity(0) applies to the calling thread; threads and processes inherit their creator's mask. The
engine's thread counts follow its CPUs (CellContext.engine_cpus): torch's intra-op threads, llama.cpp's n_threads;
vLLM on CPU binds its OpenMP threads among the CPUs its process may use.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from harness.records import CpuIsolation


def plan(enabled: bool, clients: int = 1) -> CpuIsolation:
    """The split for this worker: one CPU per client process for the load generator, at most half of the CPUs this
    process may use (the highest-numbered), the engine the rest."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux: nothing to pin with
        return CpuIsolation(isolated=False, why="this OS does not let a process choose its CPUs")
    if not enabled:
        return CpuIsolation(isolated=False, why="resources.isolate_client is false")
    if len(allowed) < 2:
        return CpuIsolation(isolated=False, why=f"only CPU {allowed[0]} is available")
    n = max(1, min(clients, len(allowed) // 2))
    return CpuIsolation(isolated=True, why=f"{len(allowed)} CPUs available", client_cpus=allowed[-n:],
                        engine_cpus=allowed[:-n])


class Pinning:
    """The two steps, for one worker."""

    def __init__(self, split: CpuIsolation):
        self.split = split
        self.before: set[int] = set()  # native ids of the threads that were there before the engine

    def engine_phase(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.split.isolated:
            return
        self.before = {t.native_id for t in threading.enumerate() if t.native_id is not None}
        engine = self.split.engine_cpus
        os.sched_setaffinity(0, engine)
        loop.set_default_executor(ThreadPoolExecutor(initializer=os.sched_setaffinity, initargs=(0, engine),
                                                     thread_name_prefix="engine"))

    def client_phase(self) -> None:
        if not self.split.isolated:
            return
        os.sched_setaffinity(0, self.split.client_cpus)
        for tid in self.before:
            try:
                os.sched_setaffinity(tid, self.split.client_cpus)
            except OSError:  # the thread ended meanwhile
                pass
