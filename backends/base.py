"""The backend protocol: one small async interface for every engine, in-process or over HTTP.

A backend knows its engine and nothing about metrics: it turns a `Request` into a stream of timestamped
`TokenEvent`s ended by one `Usage`. The harness's reducer computes every metric from those events.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

# The protocol's types live in the core, which the harness shares; backends and plugins import them from here.
from harness.core.errors import BackendError
from harness.core.events import (Capabilities, CellContext, ModelInfo, PrefixReuse, Request, RequestSent, TokenEvent,
                                  Usage, now)
from harness.core.processes import Server
from harness.core.spec import BackendSpec

__all__ = ["Backend", "BackendError", "BackendSpec", "Capabilities", "CellContext", "EngineThread", "ModelInfo",
           "NoOptions", "PrefixReuse", "Request", "RequestSent", "TokenEvent", "TorchBackend", "Usage", "cpu_affinity",
           "now", "vram_share"]


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


def vram_share(budget: int, gpu_total: int) -> float:
    """The share of the card a VRAM budget is, rounded down to 0.01% so the budget holds, at most the whole card:
    what engines take as a memory fraction (vLLM's gpu_memory_utilization, TGI's --cuda-memory-fraction, torch's
    set_per_process_memory_fraction)."""
    share = min(1.0, math.floor(budget / gpu_total * 10_000) / 10_000)
    if share <= 0:
        raise BackendError(f"resources.vram_budget: {budget} bytes is less than 0.01% of the GPU's {gpu_total} bytes")
    return share


class EngineThread:
    """The one thread an in-process engine runs on: its load, every request, its release (own_engine's serving loop
    is that thread for ours). libgomp, torch's and ggml's OpenMP, keeps a pool of worker threads for each thread that
    ran a parallel region, while that thread lives, and with more pooled threads than CPUs it stops spinning between
    regions: spread over the executor's threads, an engine paid a wake-up per region (own_engine.serving has the
    figures).

        engine = EngineThread("hf")
        await engine.call(load)
        stream = engine.stream(lambda emit: engine_generate(..., on_token=emit))
        async for event in stream: ...   # then stream.result is what the call returned
    """

    def __init__(self, name: str):
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-engine")

    async def call(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    def stream(self, work: Callable[[Callable[[Any], None]], Any]) -> EngineStream:
        return EngineStream(work, self.executor)

    def close(self) -> None:
        """The thread ends once what it was given is done (its OpenMP pool with it)."""
        self.executor.shutdown(wait=False)


class EngineStream:
    """A blocking engine call on the engine's thread, its tokens as an async stream: `work(emit)` calls `emit(event)`
    as tokens come (stamped there, close to the engine); `result` is what `work` returned."""

    def __init__(self, work: Callable[[Callable[[Any], None]], Any], executor: ThreadPoolExecutor):
        self.work, self.executor, self.result = work, executor, None

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        def run():
            try:
                return self.work(lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        future = loop.run_in_executor(self.executor, run)
        while (item := await queue.get()) is not done:
            yield item
        self.result = await future


class Backend(ABC):
    kind: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    capabilities: ClassVar[Capabilities] = Capabilities()
    server: Server | None = None  # the server process this backend launched (harness.core.processes.launch), if any

    def __init__(self, spec: BackendSpec, model: ModelInfo, ctx: CellContext):
        self.spec = spec
        self.model = model
        self.ctx = ctx
        self.options = self.Options.model_validate(spec.options)

    @classmethod
    def check_spec(cls, spec: BackendSpec) -> str | None:
        """A problem with the spec beyond its options (e.g. a required url), as 'field: what was expected'."""
        return None

    @classmethod
    def process_environment(cls, spec: BackendSpec) -> dict[str, str]:
        """Variables an in-process engine's libraries read once, when they load (OpenMP's wait policy) or as the
        process starts (glibc's malloc): the cell's worker process starts with them."""
        return {}

    @classmethod
    def missing(cls, spec: BackendSpec) -> str | None:
        """Why the engine this spec needs is not installed here (and how to install it), or None when it is: a
        backend marked `optional` is then skipped rather than failed. Checked before the cell's worker starts."""
        return None

    async def prepare(self) -> None:
        """One-off work before start() whose result later runs reuse (a format conversion, cached): timed apart
        from the load time, so a first run's load time is not inflated by it. start() must still work without it."""

    @abstractmethod
    async def start(self) -> None:
        """Load the engine or launch/attach the server; returns when it can serve."""

    async def exit_reason(self, wait_s: float = 0.0) -> str | None:
        """After a failed request: why the engine can serve nothing more (its launched server exited), waiting up
        to wait_s for a dying server to be gone; None while it can serve. First line short, details after it."""
        if self.server is None:
            return None
        if wait_s > 0 and self.server.exited() is None:
            await asyncio.to_thread(self.server.wait_exit, wait_s)
        return self.server.exit_reason()

    @abstractmethod
    async def stop(self) -> None:
        """Release everything start() took: memory, processes, files."""

    @abstractmethod
    def generate(self, request: Request) -> AsyncIterator[TokenEvent | Usage]:
        """Stream the request's tokens; the last item is a Usage."""

    def environment(self) -> dict[str, Any]:
        """Engine versions and settings worth keeping in the results."""
        return {}

    async def server_metrics(self) -> dict[str, Any]:
        """What the engine reports about itself over the cell (e.g. its Prometheus counters); {} if nothing."""
        return {}

    async def prefix_reuse(self) -> PrefixReuse | None:
        """After the cell, before stop(): how many prompt tokens the engine reused from its prefix cache, as it
        counts them; None for an engine that keeps no cache across requests."""
        return None

    def offload_dirs(self) -> list[Path]:
        """Folders the engine writes offloaded weights or KV into: their size is tracked, their cache dropped."""
        return []

    def disk_need(self) -> tuple[Path, int] | None:
        """(folder, bytes) the engine will write: the cell is refused up front when that file system has less free."""
        return None

    def logical_io(self) -> dict[str, Any]:
        """Bytes the engine itself counts per tier and phase, kept beside the measured ones (after the cell)."""
        return {}

    def torch_allocator(self) -> Callable[[], tuple[int, int]] | None:
        """For in-process torch engines on CUDA: harness.core.gpu.torch_peak_reader(), so allocator peaks are recorded."""
        return None

    async def open_connections(self, n: int) -> None:
        """Have n connections to the server open before the load starts, so no measured request pays for a connect
        (engines served over HTTP; an in-process engine has none)."""

    def decode(self, token_ids: list[int]) -> str | None:
        """The text of generated token ids (record_outputs), for an engine that streams ids without text: decoded
        with the model folder's tokenizer.json, which every engine here reads its vocabulary from; None without one."""
        if getattr(self, "_tokenizer", None) is None:
            path = self.model.path / "tokenizer.json"
            if not path.is_file():
                return None
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)

    def attach_spec(self) -> dict[str, Any] | None:
        """The BackendSpec fields (`url`, ...) with which a backend of the same kind in another client process
        (load.clients) reaches the engine this one started; None when no other process can (an in-process engine)."""
        return None


def cpu_affinity(pid: int = 0) -> str | list[int] | None:
    """The CPUs a process (0: this one) may run on, as the OS says: "all" when it may use every one (so machines of
    different sizes compare equal; their core counts are compared apart), else their numbers; None where the OS
    does not say."""
    try:
        cpus = sorted(os.sched_getaffinity(pid))
    except (AttributeError, OSError):
        return None
    return "all" if len(cpus) == os.cpu_count() else cpus


def allowed_cpus() -> int:
    """How many CPUs this thread may run on (the worker pins the engine's to those it gave it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def thread_count(asked: int | None, given: int | None, allowed: int) -> tuple[int, str | None]:
    """torch threads for an engine: those asked (num_threads), else one per CPU the worker gave it (`given`), else
    one per CPU this process may run on (`allowed`); never more than `allowed`, since threads beyond the CPUs wait
    for each other at every parallel region. Returns (threads, why they were capped, or None)."""
    want = asked or given or allowed
    if want <= allowed:
        return want, None
    return allowed, f"num_threads {want} capped at {allowed}: the engine may run on {allowed} CPU(s)"


class TorchBackend(Backend):
    """An engine that runs torch inside the worker on `options.device`: on CUDA its allocator peaks are recorded."""
    threads_note: str | None = None

    def set_threads(self, asked: int | None) -> None:
        """torch's intra-op threads for this engine (thread_count), from the thread that loads it: both torch engines
        (transformers, own) on the same rule, so one is never oversubscribed beside the other. llama.cpp takes the
        engine's CPUs by default too, but an n_threads it is given is not capped."""
        import torch

        threads, self.threads_note = thread_count(asked, self.ctx.engine_threads(), allowed_cpus())
        if self.threads_note:
            print(f"{self.spec.name}: {self.threads_note}", file=sys.stderr)
        torch.set_num_threads(threads)

    def cpu_settings(self) -> dict[str, Any]:
        """What decides its CPU speed, as torch, OpenMP and the OS report them in this process (not as the scenario
        asked): the gate's environment guard compares them between runs."""
        import torch

        return {"torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (libgomp spins a while, then sleeps)"),
                "cpu_affinity": cpu_affinity(), "threads_note": self.threads_note}

    def torch_allocator(self) -> Callable[[], tuple[int, int]] | None:
        from harness.core.gpu import torch_peak_reader

        return torch_peak_reader() if self.options.device.startswith("cuda") else None
