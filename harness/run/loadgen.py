"""Load patterns: when each request is sent. Sequential, fixed concurrency (closed loop), Poisson arrivals (open loop).

A backend that serves fewer requests at once than the load asks (Capabilities.max_concurrency) gets them queued here:
at most that many are in flight, the others wait their turn, and the worker records the cap in the results.

Every request is handed to `send` with the time it was meant to leave (its scheduled time, on the cell's clock
`harness.core.events.now`): the reducer reports the dispatch lag (schedule → send) and the achieved rate from it.
With `load.clients: N` the load is split across N client processes: each runs `run_load` on its `ClientShare`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from harness.config.scenario import ConcurrencyLoad, Load, PoissonLoad
from harness.core.events import now

R = TypeVar("R")
T = TypeVar("T")

MAX_OPEN_CONNECTIONS = 256


@dataclass(frozen=True)
class ClientShare:
    """Client `index` of `count`: it sends items index, index + count, ... of the one global schedule (so the merged
    arrivals are exactly the single-process ones), and its part of a closed loop's concurrency."""
    index: int = 0
    count: int = 1

    def items(self, items: list[T]) -> list[T]:
        return items[self.index::self.count]

    def width(self, width: int) -> int:
        return width // self.count + (1 if self.index < width % self.count else 0)


def poisson_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Send times (s, from the start) of n requests with exponential gaps of mean 1/rate; seeded, so reproducible.

    Rescaled so the last request leaves at (n - 1) / rate, as vLLM's client rescales its schedule: the schedule
    offers exactly `rate` whatever the seed (unscaled, "rate 40" offered 37-44 req/s over 100 requests)."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    offsets = np.concatenate([[0.0], np.cumsum(gaps[1:])])[:n]
    if n > 1:
        offsets *= (n - 1) / rate / offsets[-1]
    return offsets.tolist()


def load_width(load: Load) -> int | None:
    """How many requests the load keeps in flight at most; None for an open loop (no bound)."""
    if isinstance(load, PoissonLoad):
        return None
    return load.concurrency if isinstance(load, ConcurrencyLoad) else 1


def connections_needed(load: Load, max_concurrency: int | None, latency_s: float | None,
                       share: ClientShare = ClientShare()) -> int:
    """How many connections a client opens before the load: its share of the load's width; for an open loop, twice
    the requests in flight on average (Little's law: rate × latency, `latency_s` from the warm-up) for the bursts."""
    width = load_width(load)
    if width is None:
        width = math.ceil(2 * load.rate * (latency_s or 1.0)) + 1
    if max_concurrency is not None:
        width = min(width, max_concurrency)
    return max(1, min(share.width(width), MAX_OPEN_CONNECTIONS))


async def sleep_until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - now()))


async def run_load(load: Load, items: list[T], send: Callable[[T, float], Awaitable[R]], seed: int = 0,
                   max_concurrency: int | None = None, share: ClientShare = ClientShare(),
                   t0: float | None = None) -> list[R]:
    """Send this client's share of the items under the load pattern, from t0 (default: now); `send(item,
    t_scheduled)`. Results come back in item order."""
    mine = share.items(items)
    t0 = now() if t0 is None else t0
    if isinstance(load, PoissonLoad):
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def at(t: float, item: T) -> R:
            await sleep_until(t)
            if gate is None:
                return await send(item, t)
            queued = gate.locked()
            async with gate:
                # Waiting for the backend's declared cap is the server's limit, not the client's lag.
                return await send(item, now() if queued else t)

        offsets = share.items(poisson_offsets(len(items), load.rate, seed))
        return list(await asyncio.gather(*(at(t0 + o, it) for o, it in zip(offsets, mine))))

    width = share.width(load_width(load))
    if max_concurrency is not None:
        width = min(width, max_concurrency)
    results: list[R | None] = [None] * len(mine)
    queue = iter(enumerate(mine))

    async def worker() -> None:
        await sleep_until(t0)
        for i, item in queue:  # a shared iterator: each worker takes the next item as soon as it is free
            results[i] = await send(item, now())

    await asyncio.gather(*(worker() for _ in range(min(width, len(mine)))))
    return results  # type: ignore[return-value]
