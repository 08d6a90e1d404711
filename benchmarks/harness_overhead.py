"""The harness's own cost per streamed token, against a backend that costs nothing.

Streams N tokens from an in-process backend that yields pre-stamped events instantly, once through the worker's
`measure` (what every cell does) and once as a bare loop over the same generator; the difference per token is what
the harness adds. Also times the reducer per request. Run: python benchmarks/harness_overhead.py
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path


from backends.base import Backend, CellContext, ModelInfo, Request, TokenEvent, Usage, now
from harness.results.metrics import reduce_repetition
from harness.config.scenario import SLO
from harness.core.spec import BackendSpec
from harness.run.worker import measure


class Instant(Backend):
    kind = "instant"

    async def start(self): ...
    async def stop(self): ...

    async def generate(self, request: Request):
        for k in range(request.max_tokens):
            yield TokenEvent(t=now(), n_tokens=1, token_ids=[k])
        yield Usage(1, request.max_tokens, "engine", "engine")


async def main(tokens: int = 200_000, per_request: int = 1000) -> None:
    b = Instant(BackendSpec(name="i", kind="instant"), ModelInfo("m", Path(".")), CellContext(dir=Path(".")))
    reqs = [Request(id=i, prompt="", prompt_token_ids=[1], max_tokens=per_request) for i in range(tokens // per_request)]

    t0 = time.perf_counter()
    for r in reqs:
        async for _ in b.generate(r):
            pass
    bare = time.perf_counter() - t0

    t0 = time.perf_counter()
    records = [await measure(b, r, 0, keep_ids=True) for r in reqs]
    measured = time.perf_counter() - t0

    t0 = time.perf_counter()
    reduce_repetition(records, SLO(ttft_ms=100))
    reduce_s = time.perf_counter() - t0

    print(f"tokens streamed: {tokens}")
    print(f"bare generator:  {bare / tokens * 1e6:.2f} us/token")
    print(f"through measure: {measured / tokens * 1e6:.2f} us/token")
    print(f"harness overhead: {(measured - bare) / tokens * 1e6:.2f} us/token "
          f"({measured / bare:.2f}x the bare loop)")
    print(f"reducer: {reduce_s / len(records) * 1e3:.3f} ms/request of {per_request} tokens")


if __name__ == "__main__":
    asyncio.run(main())
