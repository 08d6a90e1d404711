"""Load patterns: when each request is sent. Sequential, fixed concurrency (closed loop), Poisson arrivals (open loop).

A backend that serves fewer requests at once than the load asks (Capabilities.max_concurrency) gets them queued here:
at most that many are in flight, the others wait their turn, and the worker records the cap in the results.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np

from harness.config.scenario import ConcurrencyLoad, Load, PoissonLoad

R = TypeVar("R")
T = TypeVar("T")


def poisson_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Send times (s, from the start) of n requests with exponential gaps of mean 1/rate; seeded, so reproducible."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return [0.0, *np.cumsum(gaps[1:]).tolist()][:n]


def load_width(load: Load) -> int | None:
    """How many requests the load keeps in flight at most; None for an open loop (no bound)."""
    if isinstance(load, PoissonLoad):
        return None
    return load.concurrency if isinstance(load, ConcurrencyLoad) else 1


async def run_load(load: Load, items: list[T], send: Callable[[T], Awaitable[R]], seed: int = 0,
                   max_concurrency: int | None = None) -> list[R]:
    """Send every item under the load pattern; results come back in item order."""
    if isinstance(load, PoissonLoad):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()

        async def at(offset: float, item: T) -> R:
            await asyncio.sleep(max(0.0, t0 + offset - loop.time()))
            async with gate:
                return await send(item)

        return list(await asyncio.gather(*(at(o, it) for o, it in zip(poisson_offsets(len(items), load.rate, seed), items))))

    width = load_width(load)
    if max_concurrency is not None:
        width = min(width, max_concurrency)
    results: list[R | None] = [None] * len(items)
    queue = iter(enumerate(items))

    async def worker() -> None:
        for i, item in queue:  # a shared iterator: each worker takes the next item as soon as it is free
            results[i] = await send(item)

    await asyncio.gather(*(worker() for _ in range(min(width, len(items)))))
    return results  # type: ignore[return-value]
