"""Load patterns: when each request is sent. Sequential, fixed concurrency (closed loop), Poisson arrivals (open loop)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np

from harness.scenario import ConcurrencyLoad, PoissonLoad, SequentialLoad

R = TypeVar("R")
T = TypeVar("T")


def poisson_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Send times (s, from the start) of n requests with exponential gaps of mean 1/rate; seeded, so reproducible."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return [0.0, *np.cumsum(gaps[1:]).tolist()][:n]


async def run_load(load: SequentialLoad | ConcurrencyLoad | PoissonLoad, items: list[T],
                   send: Callable[[T], Awaitable[R]], seed: int = 0) -> list[R]:
    """Send every item under the load pattern; results come back in item order."""
    if isinstance(load, PoissonLoad):
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def at(offset: float, item: T) -> R:
            await asyncio.sleep(max(0.0, t0 + offset - loop.time()))
            return await send(item)

        return list(await asyncio.gather(*(at(o, it) for o, it in zip(poisson_offsets(len(items), load.rate, seed), items))))

    width = load.concurrency if isinstance(load, ConcurrencyLoad) else 1
    results: list[R | None] = [None] * len(items)
    queue = iter(enumerate(items))

    async def worker() -> None:
        for i, item in queue:  # a shared iterator: each worker takes the next item as soon as it is free
            results[i] = await send(item)

    await asyncio.gather(*(worker() for _ in range(min(width, len(items)))))
    return results  # type: ignore[return-value]
