"""Our offloading paged-attention engine (own_engine), in process.

Requests go to the engine's continuous-batching scheduler (own_engine.scheduler), stepped on one engine thread:
they join and leave between passes over the weights, up to `max_batch` decoding together, prompts chunked in
between. Tokens are stamped on that thread as they are chosen; the engine's logical bytes per tier and phase, its
prefix-cache counts and its preemptions go into the results.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from backends.base import BackendError, PrefixReuse, Request, TokenEvent, TorchBackend, Usage, now

Tier = Literal["auto", "gpu", "cpu", "disk"]


class OwnOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device: str = Field("cpu", description="cpu, cuda, cuda:N")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(None, description="weights as stored and "
                                                                               "streamed; default: the checkpoint's")
    kv_dtype: Literal["float32", "float16", "bfloat16"] | None = Field(None, description="default: the compute "
                                                                                  "dtype (read in place)")
    vram_budget: str | None = Field(None, description="e.g. 8GiB; default: the scenario's resources.vram_budget")
    weights: Tier = Field("auto", description="where layer weights live: gpu (resident), cpu (pinned host), disk")
    kv: Tier = Field("auto", description="where KV blocks live")
    offload_dir: Path | None = Field(None, description="default: a folder in the cell's folder")
    keep_offload: bool = False
    block_size: int | None = Field(None, gt=0)
    prefill_chunk: int | None = Field(None, gt=0)
    max_context: int = Field(8192, gt=0, description="the longest prompt + output a sequence may reach")
    max_batch: int = Field(8, gt=0, description="sequences the scheduler runs together (KV is planned for them)")
    prefix_cache: bool = Field(True, description="reuse the KV of full blocks a prompt shares with earlier ones")
    prefix_cache_dir: Path | None = Field(None, description="also keep those blocks on disk, for later runs")
    num_threads: int | None = Field(None, gt=0, description="torch threads (default: torch's, one per core)")
    probe_bandwidth: bool = Field(True, description="after the cell, measure the streaming link's bandwidth to "
                                                    "report decode time against its bound")


class OwnBackend(TorchBackend):
    kind = "own"
    Options = OwnOptions

    def offload_dir(self) -> Path:
        return self.options.offload_dir or self.ctx.dir / "offload"

    def offload_dirs(self) -> list[Path]:
        return [self.offload_dir()]

    async def start(self) -> None:
        from own_engine.scheduler import Scheduler

        self.engine = await asyncio.to_thread(self._load)
        self.scheduler = Scheduler(self.engine)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name="own_engine_scheduler", daemon=True)
        self.thread.start()

    def _load(self):
        import torch

        from own_engine.config import EngineError
        from own_engine.engine import Engine

        o = self.options
        if o.num_threads:
            torch.set_num_threads(o.num_threads)
        try:
            engine = Engine(self.model.path, device=o.device, dtype=o.dtype, kv_dtype=o.kv_dtype,
                            vram_budget=o.vram_budget or self.ctx.vram_budget, weights=o.weights, kv=o.kv,
                            offload_dir=self.offload_dir(), keep_offload=o.keep_offload, max_context=o.max_context,
                            max_batch=o.max_batch, block_size=o.block_size, prefill_chunk=o.prefill_chunk,
                            prefix_cache=o.prefix_cache, prefix_cache_dir=o.prefix_cache_dir)
        except EngineError as e:
            raise BackendError(f"own engine: {e}") from None
        return engine

    def _serve(self) -> None:
        """The engine thread: take new requests between steps, wait for one when there is nothing to run."""
        while True:
            while not self.inbox.empty() or not self.scheduler.busy:
                job = self.inbox.get()
                if job is None:
                    return
                self.scheduler.add(job)
            try:
                self.scheduler.step()
            except Exception as e:  # a bug, not a failed pass (the scheduler fails those requests itself)
                self.scheduler.fail_all(e)

    async def stop(self) -> None:
        if getattr(self, "thread", None) is not None:
            self.inbox.put(None)
            await asyncio.to_thread(self.thread.join)
        if getattr(self, "engine", None) is not None:
            self.engine.close()

    async def generate(self, request: Request) -> AsyncIterator[TokenEvent | Usage]:
        from own_engine.scheduler import GenerationRequest

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_token(token: int) -> None:
            loop.call_soon_threadsafe(events.put_nowait, TokenEvent(t=now(), n_tokens=1, token_ids=[token]))

        job = GenerationRequest(request.prompt_token_ids, request.max_tokens, request.temperature,
                                seed=request.seed if request.temperature > 0 else None,
                                ignore_eos=request.ignore_eos, on_token=on_token,
                                on_finish=lambda job: loop.call_soon_threadsafe(events.put_nowait, job.error))
        self.inbox.put(job)
        n = 0
        try:
            while (item := await events.get()) is not None:
                if isinstance(item, Exception):
                    raise BackendError(f"own engine: {item}")
                n += 1
                yield item
        finally:
            job.cancelled = True  # a client that went away frees its sequence at the next step
        yield Usage(len(request.prompt_token_ids), n, "engine", "engine")

    async def prefix_reuse(self) -> PrefixReuse:
        # The engine reuses whole KV blocks: each full block found cached (in memory or on disk) is block_size tokens.
        hits = self.engine.stats.prefix["hit_blocks"]
        return PrefixReuse(hits * self.engine.plan.block_size,
                           "own engine: full KV blocks found cached (logical_io.prefix_cache.hit_blocks) × block_size"
                           + ("" if self.options.prefix_cache else "; prefix_cache: false"))

    def logical_io(self) -> dict[str, Any]:
        """The engine's own byte counts per tier and phase, and decode time against the bound of its slowest link.

        The bound's probe runs after the measurement: when it cannot run (a full disk, say) decode_bound says why
        and the cell keeps its results."""
        from own_engine.bandwidth import probe_bandwidth

        if getattr(self, "engine", None) is None:
            return {}
        stats = self.engine.stats.as_dict()
        tokens, seconds = stats["tokens"].get("decode", 0), stats["phase_seconds"].get("decode", 0.0)
        link = "host->device" if self.engine.device.type == "cuda" else "disk->host"
        streamed = stats["transfers"].get(f"decode/{link}", {}).get("bytes", 0)
        if tokens and streamed and self.options.probe_bandwidth:
            probe = probe_bandwidth(self.engine.device, directory=self.offload_dir())
            bound = {"link": link, "bytes_per_token": streamed / tokens, "measured_s_per_token": seconds / tokens}
            if probe.bytes_per_s:
                s_per_token = streamed / tokens / probe.bytes_per_s
                bound.update(probe_bytes=probe.nbytes, probe_bytes_per_s=probe.bytes_per_s,
                             bound_s_per_token=s_per_token, ratio_to_bound=seconds / tokens / s_per_token)
            else:
                bound["probe_error"] = probe.error
            stats["decode_bound"] = bound
        return stats

    def environment(self) -> dict[str, Any]:
        import torch

        plan = self.engine.plan
        return {"engine": "own_engine", "torch": torch.__version__, "device": str(plan.device),
                "dtype": str(plan.dtype).removeprefix("torch."),
                "compute_dtype": str(plan.compute_dtype).removeprefix("torch."),
                "kv_dtype": str(plan.kv_dtype).removeprefix("torch."), "plan": plan.explain(),
                "layer_tiers": plan.layer_tiers, "kv_blocks": plan.kv_blocks, "block_size": plan.block_size,
                "prefill_chunk": plan.prefill_chunk, "step_tokens": plan.step_tokens,
                "max_batch": self.options.max_batch, "prefix_cache": self.options.prefix_cache,
                "prefix_cache_dir": str(self.options.prefix_cache_dir) if self.options.prefix_cache_dir else None}
