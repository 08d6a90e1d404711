"""A test backend whose token timings are known exactly, loaded into workers through LLMBENCH_PLUGINS.

It stands in for an engine only in tests of the harness itself (reducer, load patterns, failure handling):
each token is stamped at start + ttft_s + k * itl_s, after really waiting until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
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
    block_loop_s: float = 0.0  # block the event loop this long as each request starts (a misbehaving callback)
    slow_from_id: int | None = None  # requests from this id on take slow_factor times as long (a later repetition)
    slow_factor: float = 1.0
    server: bool = False  # launch a real server process (python -m http.server) the way engine servers are launched
    prepare_s: float = 0.0  # one-off preparation (like a GGUF conversion) before start()
    kill_server_at: int | None = None  # at this request id the server is SIGKILLed and the request fails
    kill_server_while_exists: str | None = None  # ...only while this file exists
    hang_while_exists: str | None = None  # hang once the request is recorded (record_requests), while this file exists
    fill_disk_while_exists: str | None = None  # start() fills the cell folder's file system while this file exists
    env: dict[str, str] = {}  # an engine's environment: start() records sha256 of each value in CELL_DIR/env_seen.json
    process_env: dict[str, str] = {}  # its process_environment: start() fails unless the process started with it
    # Serve this many requests at once and queue the rest inside, first come first served, as an engine with that many
    # batch slots: latency rises with the load (a capacity search's knee). Each request holds its slot until done.
    slots: int | None = None
    # Write CELL_DIR/affinity.json at each request: the CPUs of the event loop's thread, of an engine thread (the
    # default executor) and of the launched server, and the thread count the worker gave the engine.
    record_affinity: bool = False


@register
class ScriptedBackend(Backend):
    kind = "scripted"
    Options = ScriptedOptions

    def __init__(self, spec, model, ctx):
        super().__init__(spec, model, ctx)
        if self.options.max_concurrency is not None:
            self.capabilities = Capabilities(max_concurrency=self.options.max_concurrency)
        self.slots = asyncio.Semaphore(self.options.slots) if self.options.slots else contextlib.nullcontext()

    async def prepare(self) -> None:
        await asyncio.sleep(self.options.prepare_s)

    @classmethod
    def process_environment(cls, spec) -> dict[str, str]:
        return dict(spec.options.get("process_env", {}))

    async def start(self) -> None:
        if self.options.process_env:  # what the process started with: variables set after it began are not there
            started = dict(v.split("=", 1) for v in Path("/proc/self/environ").read_text().split("\0") if "=" in v)
            if missing := {k: v for k, v in self.options.process_env.items() if started.get(k) != v}:
                raise BackendError(f"scripted start failure: the process started without {missing}")
        if self.options.fail_if_exists and Path(self.options.fail_if_exists).exists():
            raise BackendError(f"scripted start failure ({self.options.fail_if_exists} exists)")
        if self.options.env:
            (self.ctx.dir / "env_seen.json").write_text(json.dumps(
                {k: hashlib.sha256(v.encode()).hexdigest() for k, v in self.options.env.items()}))
        if self.options.fill_disk_while_exists and Path(self.options.fill_disk_while_exists).exists():
            _fill(self.ctx.dir / "filler")
        if self.options.server:
            from harness.core.processes import launch

            self.server = await launch("scripted_server", lambda port: [sys.executable, "-m", "http.server", str(port),
                                                                        "--bind", "127.0.0.1"], self.ctx.dir, "/", 60)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def environment(self):
        # What a launched engine server reports: settings that change from run to run beside ones that do not.
        return {"engine": "scripted", "version": "1.0.3", "threads": 1,
                **({"url": self.server.url + "/v1", "log_file": str(self.server.log_path)} if self.server else {})}

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
        if o.block_loop_s:
            time.sleep(o.block_loop_s)
        if o.kill_server_at is not None and request.id >= o.kill_server_at and (
                o.kill_server_while_exists is None or Path(o.kill_server_while_exists).exists()):
            if self.server.exited() is None:
                os.killpg(self.server.pgid, signal.SIGKILL)
            raise ConnectionRefusedError(111, "Connection refused")  # what a client sees of a dead server
        start = now()
        slow = o.slow_factor if o.slow_from_id is not None and request.id >= o.slow_from_id else 1.0
        if o.record_requests:
            with (self.ctx.dir / "seen.jsonl").open("a") as f:
                f.write(json.dumps({"id": request.id, "temperature": request.temperature, "seed": request.seed,
                                    "start": start, "prompt": request.prompt,
                                    "prompt_tokens": len(request.prompt_token_ids)}) + "\n")
        if o.record_affinity:
            (self.ctx.dir / "affinity.json").write_text(json.dumps({
                "loop": sorted(os.sched_getaffinity(0)),
                "engine_thread": sorted(await asyncio.to_thread(os.sched_getaffinity, 0)),
                "server": sorted(os.sched_getaffinity(self.server.proc.pid)) if self.server else None,
                "engine_threads": self.ctx.engine_threads()}))
        if o.hang_while_exists is not None and Path(o.hang_while_exists).exists():
            await asyncio.sleep(3600)
        if o.busy_prefill:
            await asyncio.to_thread(_spin_until, start + o.ttft_s)
        async with self.slots:
            if o.slots:
                start = max(start, now())  # a queued request starts when it gets a slot
            for k in range(request.max_tokens):
                t = start + (o.ttft_s + k * o.itl_s) * slow
                await asyncio.sleep(max(0.0, t - now()))
                yield TokenEvent(t=t, n_tokens=1, token_ids=[k])
        yield Usage(len(request.prompt_token_ids), request.max_tokens, "engine", "engine")


def _spin_until(t: float) -> None:
    # hashlib releases the GIL on large buffers: the CPU is busy, the event loop is not held up.
    block = bytes(1 << 20)
    while time.perf_counter() < t:
        hashlib.sha256(block)


def _fill(path: Path) -> None:
    with path.open("wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1):  # to the last byte that fits
            try:
                while True:
                    f.write(bytes(size))
            except OSError:  # ENOSPC
                pass
