"""Our offloading paged-attention engine (own_engine), in process.

Requests go to the engine's serving loop (Engine.serve: its continuous-batching scheduler stepped on one engine
thread): they join and leave between passes over the weights, up to `max_batch` decoding together, prompts chunked
in between. Tokens are stamped on that thread as they are chosen; the engine's logical bytes per tier and phase, its
prefix-cache counts and its preemptions go into the results.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from backends.base import BackendError, PrefixReuse, Request, TokenEvent, TorchBackend, Usage, now
from own_engine.engine_config import Budget, EngineConfig, MaxBatch, MaxContext, OffloadDir


# Spins of an idle OpenMP thread before it sleeps, under omp_wait_policy: bounded. Measured on a 2-core Xeon (AMX)
# VM, 201M bf16 model, one decode step at 512 tokens, 2 threads (ms, quiet / one busy-looping process beside it):
# 5,000 spins 25.5 / 45, 20,000 22.0 / 59, 50,000 20.9 / 64, libgomp's default (300,000) 20.9 / 189 (an earlier
# series, helpers' work running too: passive 31 / 40, 1,000 spins 29 / 42, 10,000 24 / 57, active 25 / 490). Each
# parallel region that finds its threads asleep pays a wake-up (~0.1-0.2 ms in a VM). 20,000: within 5% of the
# default when quiet, 2.7x its quiet time beside a busy process where the default is 9x.
SPIN_COUNT = 20000
WAIT_ENVIRONMENT = {"bounded": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": str(SPIN_COUNT)},
                    "passive": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"},
                    "active": {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "INFINITE"}}


class OwnOptions(EngineConfig):
    """The engine's options (own_engine.engine_config says what each means), with the defaults a benchmark needs
    where they differ from the library's, and the backend's own two."""
    # A benchmark sends several requests at once, of a few thousand tokens: plan the KV for 8 of 8,192.
    max_context: MaxContext = 8192
    max_batch: MaxBatch = 8
    vram_budget: Budget = Field(None, description="e.g. 8GiB; none: the scenario's resources.vram_budget")
    offload_dir: OffloadDir = Field(None, description="where disk-tier files are written (none: a folder in the "
                                                      "cell's folder); a folder holding files of yours is worked in "
                                                      "beside them (its own_engine/ subfolder), never emptied")
    num_threads: int | None = Field(None, gt=0, description="torch threads (default: one per CPU the engine may run "
                                                            "on); more than those CPUs are capped to them, with a "
                                                            "note in the cell's engine record")
    omp_wait_policy: Literal["bounded", "passive", "active"] = Field(
        "bounded", description="how torch's idle OpenMP threads wait for the next parallel region: bounded spins "
                               f"briefly (GOMP_SPINCOUNT={SPIN_COUNT}), then sleeps; passive sleeps at once (each "
                               "region then wakes them: slower); active spins, which on a core another process "
                               "also uses made decoding 10-100× slower")
    probe_bandwidth: bool = Field(True, description="after the cell, measure the bandwidth of the link decode is "
                                                    "bound by (the one weights streamed across; on a CPU where "
                                                    "nothing streamed, memory) to report decode time against it")


class OwnBackend(TorchBackend):
    kind = "own"
    Options = OwnOptions

    @classmethod
    def check_spec(cls, spec) -> str | None:
        from own_engine.owned import claimable

        for field in ("offload_dir", "prefix_cache_dir"):
            if spec.options.get(field) is not None:
                if problem := claimable(Path(spec.options[field]).expanduser(), f"options.{field}"):
                    return problem
        return None

    @classmethod
    def process_environment(cls, spec) -> dict[str, str]:
        # Read by libgomp when torch loads: a spinning thread whose partner waits for a busy core burns its slice.
        # GOMP_SPINCOUNT is set in every policy: it overrides OMP_WAIT_POLICY, so one inherited cannot change it.
        # MALLOC_ARENA_MAX, read by glibc as the process starts: every thread allocates from the main arena, which
        # keeps what a pass frees (own_engine.allocator). The engine thread's own arena, made before the engine
        # could say otherwise, gave its heaps back after each pass: 30,000-60,000 page faults a 2,048-token prefill
        # of the 201M model, and through `bench run` two requests in three at ~850 ms where ~400 were usual.
        return {**WAIT_ENVIRONMENT[str(spec.options.get("omp_wait_policy", "bounded"))], "MALLOC_ARENA_MAX": "1"}

    def offload_dir(self) -> Path:
        return self.options.offload_dir or self.ctx.dir / "offload"

    def offload_dirs(self) -> list[Path]:
        return [self.offload_dir()]

    async def start(self) -> None:
        from own_engine.serving import ServingLoop

        self.events_loop = asyncio.get_running_loop()
        self.pending: list[tuple[asyncio.Queue, Any]] = []  # events the engine thread stamped, not yet delivered
        self.pending_lock = threading.Lock()
        self.loop = ServingLoop(self._load)  # built on the thread that steps it: all its torch work on one thread
        self.engine = await asyncio.wrap_future(self.loop.ready)

    def deliver(self, queue: asyncio.Queue, item: Any) -> None:
        """From the engine thread: hand an event to a request's queue. One wake-up of the event loop carries every
        event of a step (the first schedules the delivery, the others join it): each wake-up takes the GIL from the
        engine thread in the middle of its next step."""
        with self.pending_lock:
            self.pending.append((queue, item))
            first = len(self.pending) == 1
        if first:
            self.events_loop.call_soon_threadsafe(self._deliver_pending)

    def _deliver_pending(self) -> None:
        with self.pending_lock:
            items, self.pending = self.pending, []
        for queue, item in items:
            queue.put_nowait(item)

    def _load(self):
        import torch

        from own_engine.config import EngineError
        from own_engine.engine import Engine

        o = self.options
        self.set_threads(o.num_threads)
        try:
            return Engine(self.model.path, o, vram_budget=o.vram_budget or self.ctx.vram_budget,
                          offload_dir=self.offload_dir())
        except EngineError as e:
            raise BackendError(f"own engine: {e}") from None

    async def stop(self) -> None:
        if getattr(self, "loop", None) is not None:
            await asyncio.to_thread(self.loop.close)
        if getattr(self, "engine", None) is not None:
            self.engine.close()

    async def generate(self, request: Request) -> AsyncIterator[TokenEvent | Usage]:
        from own_engine.sequence import SamplingParams, Sequence

        events: asyncio.Queue = asyncio.Queue()

        def on_token(token: int) -> None:  # stamped on the engine thread, as the token is chosen
            self.deliver(events, TokenEvent(t=now(), n_tokens=1, token_ids=[token]))

        params = SamplingParams(request.max_tokens, request.temperature,
                                seed=request.seed if request.temperature > 0 else None, ignore_eos=request.ignore_eos)
        seq = Sequence(request.prompt_token_ids, params, on_token=on_token,
                       on_finish=lambda seq: self.deliver(events, seq.error))
        self.loop.submit(seq)
        n = 0
        try:
            while (item := await events.get()) is not None:
                if isinstance(item, Exception):
                    raise BackendError(f"own engine: {item}")
                n += 1
                yield item
        finally:
            seq.cancelled = True  # a client that went away frees its sequence at the next step
        yield Usage(len(request.prompt_token_ids), n, "engine", "engine")

    async def prefix_reuse(self) -> PrefixReuse:
        # The engine reuses whole KV blocks: each full block found cached (in memory or on disk) is block_size tokens.
        hits = self.engine.stats.prefix["hit_blocks"]
        return PrefixReuse(hits * self.engine.plan.block_size,
                           "own engine: full KV blocks found cached (logical_io.prefix_cache.hit_blocks) × block_size"
                           + ("" if self.options.prefix_cache else "; prefix_cache: false"))

    def logical_io(self) -> dict[str, Any]:
        """The engine's own byte counts per tier and phase, and decode time against the bound of its slowest link:
        the link weights streamed across, or on a CPU where nothing streamed, memory (the weights and KV a decode
        step reads in place, over the bandwidth this process's threads read memory at).

        The bound's probe runs after the measurement: when it cannot run (a full disk, say) decode_bound says why
        and the cell keeps its results."""
        from own_engine.bandwidth import probe_bandwidth, probe_memory

        if getattr(self, "engine", None) is None:
            return {}
        stats = self.engine.stats.as_dict()
        tokens, seconds = stats["tokens"].get("decode", 0), stats["phase_seconds"].get("decode", 0.0)
        link = "host->device" if self.engine.device.type == "cuda" else "disk->host"
        streamed = stats["transfers"].get(f"decode/{link}", {}).get("bytes", 0)
        if not streamed and self.engine.device.type == "cpu":
            link, streamed = "memory", stats["read_bytes"].get("decode", 0)
        if tokens and streamed and self.options.probe_bandwidth:
            probe = (probe_memory() if link == "memory" else
                     probe_bandwidth(self.engine.device, directory=self.offload_dir()))
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
                "max_batch": self.engine.max_batch, "prefix_cache": self.options.prefix_cache, **self.cpu_settings(),
                "omp_spin_count": os.environ.get("GOMP_SPINCOUNT"),
                "prefix_cache_dir": str(self.options.prefix_cache_dir) if self.options.prefix_cache_dir else None}
