"""Our offloading paged-attention engine (own_engine), in process.

Requests that wait while the engine is busy are gathered into one static batch that shares each pass over the
weights (up to `max_batch`), which is what makes streamed weights pay off. Tokens are stamped in the engine's
thread as they are chosen; the engine's own logical bytes per tier and phase go into the results.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from backends.base import BackendError, Request, TokenEvent, TorchBackend, Usage, now

Tier = Literal["auto", "gpu", "cpu", "disk"]


class OwnOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device: str = Field("cpu", description="cpu, cuda, cuda:N")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(None, description="default: the checkpoint's")
    vram_budget: str | None = Field(None, description="e.g. 8GiB; default: the scenario's resources.vram_budget")
    weights: Tier = Field("auto", description="where layer weights live: gpu (resident), cpu (pinned host), disk")
    kv: Tier = Field("auto", description="where KV blocks live")
    offload_dir: Path | None = Field(None, description="default: a folder in the cell's folder")
    keep_offload: bool = False
    block_size: int | None = Field(None, gt=0)
    prefill_chunk: int | None = Field(None, gt=0)
    max_context: int = Field(8192, gt=0, description="the longest prompt + output a sequence may reach")
    max_batch: int = Field(8, gt=0, description="requests gathered into one static batch")
    num_threads: int | None = Field(None, gt=0, description="default: one core fewer when streaming from disk on CPU")
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
        self.engine = await asyncio.to_thread(self._load)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.batcher = asyncio.create_task(self._run_batches())

    def _load(self):
        import torch

        from own_engine.config import EngineError
        from own_engine.engine import Engine

        o = self.options
        if o.num_threads:
            torch.set_num_threads(o.num_threads)
        try:
            engine = Engine(self.model.path, device=o.device, dtype=o.dtype,
                            vram_budget=o.vram_budget or self.ctx.vram_budget, weights=o.weights, kv=o.kv,
                            offload_dir=self.offload_dir(), keep_offload=o.keep_offload, max_context=o.max_context,
                            max_batch=o.max_batch, block_size=o.block_size, prefill_chunk=o.prefill_chunk)
        except EngineError as e:
            raise BackendError(f"own engine: {e}") from None
        if o.num_threads is None and engine.device.type == "cpu" and "disk" in engine.plan.layer_tiers:
            # The prefetch thread reads the next layer while torch computes: with every core computing, reads and
            # compute take turns instead (measured: 0.52 vs 0.37 s/token for a 1B model on 2 cores).
            torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
        return engine

    async def stop(self) -> None:
        if getattr(self, "batcher", None) is not None:
            self.batcher.cancel()
        if getattr(self, "engine", None) is not None:
            self.engine.close()

    async def generate(self, request: Request) -> AsyncIterator[TokenEvent | Usage]:
        tokens: asyncio.Queue = asyncio.Queue()
        await self.queue.put((request, tokens))
        n = 0
        while (item := await tokens.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            n += 1
            yield item
        yield Usage(len(request.prompt_token_ids), n, "engine", "engine")

    async def _run_batches(self) -> None:
        """Take the next request, and every waiting one that samples the same way, as one static batch."""
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            key, others = self._batch_key(batch[0][0]), []
            while not self.queue.empty():
                item = self.queue.get_nowait()
                same = self._batch_key(item[0]) == key and len(batch) < self.options.max_batch
                (batch if same else others).append(item)
            for item in others:
                self.queue.put_nowait(item)
            outs = [q for _, q in batch]
            first = batch[0][0]

            def on_token(i: int, token: int) -> None:
                loop.call_soon_threadsafe(outs[i].put_nowait, TokenEvent(t=now(), n_tokens=1, token_ids=[token]))

            try:
                await asyncio.to_thread(self._generate, [r.prompt_token_ids for r, _ in batch], first, on_token)
                ends = [None] * len(outs)
            except Exception as e:
                ends = [BackendError(f"own engine: {e}")] * len(outs)
            for q, end in zip(outs, ends):
                if end is not None:
                    q.put_nowait(end)
                q.put_nowait(None)

    def _generate(self, prompts: list[list[int]], like: Request, on_token) -> None:
        marked = False

        def stamp(i: int, token: int) -> None:
            nonlocal marked
            if not marked:
                marked = True
            on_token(i, token)

        self.engine.generate(prompts, max_new_tokens=like.max_tokens, temperature=like.temperature,
                             seed=like.seed if like.temperature > 0 else None, ignore_eos=like.ignore_eos,
                             on_token=stamp)

    @staticmethod
    def _batch_key(r: Request) -> tuple:
        return r.max_tokens, r.temperature, r.ignore_eos

    def logical_io(self) -> dict[str, Any]:
        """The engine's own byte counts per tier and phase, and decode time against the bound of its slowest link."""
        from own_engine.bandwidth import probe_bandwidth

        if getattr(self, "engine", None) is None:
            return {}
        stats = self.engine.stats.as_dict()
        tokens, seconds = stats["tokens"].get("decode", 0), stats["phase_seconds"].get("decode", 0.0)
        link = "host->device" if self.engine.device.type == "cuda" else "disk->host"
        streamed = stats["transfers"].get(f"decode/{link}", {}).get("bytes", 0)
        if tokens and streamed and self.options.probe_bandwidth:
            bandwidth = probe_bandwidth(self.engine.device, directory=self.offload_dir())
            bound = streamed / tokens / bandwidth
            stats["decode_bound"] = {"link": link, "bytes_per_token": streamed / tokens, "probe_bytes_per_s": bandwidth,
                                     "bound_s_per_token": bound, "measured_s_per_token": seconds / tokens,
                                     "ratio_to_bound": seconds / tokens / bound}
        return stats

    def environment(self) -> dict[str, Any]:
        import torch

        plan = self.engine.plan
        return {"engine": "own_engine", "torch": torch.__version__, "device": str(plan.device),
                "dtype": str(plan.dtype).removeprefix("torch."), "plan": plan.explain(),
                "layer_tiers": plan.layer_tiers, "kv_blocks": plan.kv_blocks, "block_size": plan.block_size,
                "prefill_chunk": plan.prefill_chunk, "max_batch": self.options.max_batch}
