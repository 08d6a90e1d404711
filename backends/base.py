"""The backend protocol: one small async interface for every engine, in-process or over HTTP.

A backend knows its engine and nothing about metrics: it turns a `Request` into a stream of timestamped
`TokenEvent`s ended by one `Usage`. The harness's reducer computes every metric from those events.
"""

from __future__ import annotations

import asyncio
import math
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from harness.scenario import BackendSpec

now = time.perf_counter  # the one clock for every timestamp in a cell: monotonic, sub-microsecond


class BackendError(Exception):
    """An engine failed in a way the user should read: the cell is marked failed with this message."""


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class Request:
    id: int
    prompt: str
    prompt_token_ids: list[int]
    max_tokens: int
    ignore_eos: bool = True
    temperature: float = 0.0
    seed: int = 0


@dataclass
class TokenEvent:
    """A chunk of generated tokens, stamped on arrival as close to the engine as the backend can."""
    t: float
    n_tokens: int = 1
    token_ids: list[int] | None = None


@dataclass
class Usage:
    """The last item of every stream: token counts and where each came from."""
    prompt_tokens: int | None
    output_tokens: int | None
    prompt_source: str  # "engine" | "server_usage" | "client_tokenizer" | "stream_chunks"
    output_source: str
    finish_reason: str | None = None
    exact_length: bool = True  # False when the engine could not be told to ignore EOS


@dataclass
class Capabilities:
    streaming: bool = True
    exact_output_length: bool = True
    max_concurrency: int | None = None  # None: the engine batches or queues requests itself
    token_ids: bool = True


@dataclass
class ModelInfo:
    name: str
    path: Path


@dataclass
class CellContext:
    """What a backend may use beside its spec: the cell's folder (logs, offload files) and the scenario seed."""
    dir: Path
    seed: int = 0
    vram_budget: int | None = None
    phase_marks: list[tuple[str, float]] = field(default_factory=list)

    def mark(self, phase: str) -> None:
        """Phases (load, prefill, decode, idle) split resource measures; a mark starts a phase."""
        self.phase_marks.append((phase, now()))


def vram_share(budget: int, gpu_total: int) -> float:
    """The share of the card a VRAM budget is, rounded down to 0.01% so the budget holds, at most the whole card:
    what engines take as a memory fraction (vLLM's gpu_memory_utilization, TGI's --cuda-memory-fraction, torch's
    set_per_process_memory_fraction)."""
    share = min(1.0, math.floor(budget / gpu_total * 10_000) / 10_000)
    if share <= 0:
        raise BackendError(f"resources.vram_budget: {budget} bytes is less than 0.01% of the GPU's {gpu_total} bytes")
    return share


class EngineThread:
    """A blocking engine call in a worker thread, its tokens as an async stream.

    `work(emit)` runs in the thread and calls `emit(event)` as tokens come (stamped there, close to the engine);
    iterating yields those events; `result` is what `work` returned.
        stream = EngineThread(lambda emit: engine_generate(..., on_token=emit))
        async for event in stream: ...
    """

    def __init__(self, work: Callable[[Callable[[Any], None]], Any]):
        self.work, self.result = work, None

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        def run():
            try:
                return self.work(lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        future = loop.run_in_executor(None, run)
        while (item := await queue.get()) is not done:
            yield item
        self.result = await future


class Backend(ABC):
    kind: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, spec: BackendSpec, model: ModelInfo, ctx: CellContext):
        self.spec = spec
        self.model = model
        self.ctx = ctx
        self.options = self.Options.model_validate(spec.options)

    @classmethod
    def check_spec(cls, spec: BackendSpec) -> str | None:
        """A problem with the spec beyond its options (e.g. a required url), as 'field: what was expected'."""
        return None

    @abstractmethod
    async def start(self) -> None:
        """Load the engine or launch/attach the server; returns when it can serve."""

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
        """For in-process torch engines on CUDA: harness.gpu.torch_peak_reader(), so allocator peaks are recorded."""
        return None
