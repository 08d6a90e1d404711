"""A test backend whose token timings are known exactly, loaded into workers through LLMBENCH_PLUGINS.

It stands in for an engine only in tests of the harness itself (reducer, load patterns, failure handling):
each token is stamped at start + ttft_s + k * itl_s, after really waiting until then.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from backends.base import Backend, BackendError, Capabilities, Request, TokenEvent, Usage, now
from backends.registry import register


class ScriptedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttft_s: float = 0.02
    itl_s: float = 0.005
    fail_if_exists: str | None = None  # start() fails while this file exists
    crash_after: int | None = None  # the worker process kills itself at this request id
    hang: bool = False
    fail_request_ids: list[int] = []
    disk_need_bytes: int | None = None  # declared disk need, in the cell's folder
    max_concurrency: int | None = None  # declared in its capabilities: the harness must queue beyond it
    busy_prefill: bool = False  # keep a CPU busy during each request's prefill (a thread), sleep during its decode
    record_requests: bool = False  # append what each request asked for to CELL_DIR/seen.jsonl


@register
class ScriptedBackend(Backend):
    kind = "scripted"
    Options = ScriptedOptions

    def __init__(self, spec, model, ctx):
        super().__init__(spec, model, ctx)
        if self.options.max_concurrency is not None:
            self.capabilities = Capabilities(max_concurrency=self.options.max_concurrency)

    async def start(self) -> None:
        if self.options.fail_if_exists and Path(self.options.fail_if_exists).exists():
            raise BackendError(f"scripted start failure ({self.options.fail_if_exists} exists)")

    async def stop(self) -> None:
        pass

    def disk_need(self):
        return (self.ctx.dir, self.options.disk_need_bytes) if self.options.disk_need_bytes else None

    async def generate(self, request: Request):
        o = self.options
        if o.crash_after is not None and request.id >= o.crash_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if o.hang:
            await asyncio.sleep(3600)
        if request.id in o.fail_request_ids:
            raise BackendError(f"scripted failure of request {request.id}")
        start = now()
        if o.record_requests:
            with (self.ctx.dir / "seen.jsonl").open("a") as f:
                f.write(json.dumps({"id": request.id, "temperature": request.temperature, "seed": request.seed,
                                    "start": start}) + "\n")
        if o.busy_prefill:
            await asyncio.to_thread(_spin_until, start + o.ttft_s)
        for k in range(request.max_tokens):
            t = start + o.ttft_s + k * o.itl_s
            await asyncio.sleep(max(0.0, t - now()))
            yield TokenEvent(t=t, n_tokens=1, token_ids=[k])
        yield Usage(len(request.prompt_token_ids), request.max_tokens, "engine", "engine")


def _spin_until(t: float) -> None:
    # hashlib releases the GIL on large buffers: the CPU is busy, the event loop is not held up.
    block = bytes(1 << 20)
    while time.perf_counter() < t:
        hashlib.sha256(block)
