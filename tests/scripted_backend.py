"""A test backend whose token timings are known exactly, loaded into workers through LLMBENCH_PLUGINS.

It stands in for an engine only in tests of the harness itself (reducer, load patterns, failure handling):
each token is stamped at start + ttft_s + k * itl_s, after really waiting until then.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from backends.base import Backend, BackendError, Request, TokenEvent, Usage, now
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


@register
class ScriptedBackend(Backend):
    kind = "scripted"
    Options = ScriptedOptions

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
        for k in range(request.max_tokens):
            t = start + o.ttft_s + k * o.itl_s
            await asyncio.sleep(max(0.0, t - now()))
            yield TokenEvent(t=t, n_tokens=1, token_ids=[k])
        yield Usage(len(request.prompt_token_ids), request.max_tokens, "engine", "engine")
