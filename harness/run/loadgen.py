"""Load patterns: when each request is sent. Sequential, fixed concurrency (closed loop), Poisson arrivals or a
replayed trace's (open loop). A capacity search (harness/run/capacity.py) runs one of these per step.

A backend that serves fewer requests at once than the load asks (Capabilities.max_concurrency) gets them queued here:
at most that many are in flight, the others wait their turn (open and closed loops alike: the load offered is the
same for every backend), each request's wait is recorded (t_queued) and counted in its latency, and the worker
records the cap in the results.

Every request is handed to `send` with the time it was meant to leave (its scheduled time, on the cell's clock
`harness.core.events.now`): the reducer reports the dispatch lag (schedule → send) and the achieved rate from it.
With `load.clients: N` the load is split across N client processes: each runs `run_load` on its `ClientShare`.

With `max_duration_s` no request arrives (open loop) or leaves (closed loop) later than that after t0: the ones in
flight then finish and are measured (cutting them would record failures the engine did not make), as do those that
arrived in time and wait for a backend's max_concurrency; the ones not sent come back as None.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from harness.config.scenario import CapacityLoad, ConcurrencyLoad, Load, PoissonLoad, TraceLoad
from harness.config.shapes import RampUp
from harness.core.events import now

R = TypeVar("R")
T = TypeVar("T")

MAX_OPEN_CONNECTIONS = 256

# When a request arrived (open loop) or its user offered it (closed loop), if it then waited for the backend's
# max_concurrency: read by `send` (in the request's own task) to record it, since that wait is what a user of the
# engine would wait (its latencies count it), though it is not the client's dispatch lag.
QUEUED_AT: ContextVar[float | None] = ContextVar("QUEUED_AT", default=None)


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


def poisson_offsets(n: int, rate: float, seed: int, burstiness: float = 1.0,
                    ramp_up: RampUp | None = None) -> list[float]:
    """Send times (s, from the start) of n requests at `rate`; seeded, so reproducible. Gaps are exponential (a
    Poisson process), or gamma-distributed of shape `burstiness` (vLLM's: below 1 burstier, above 1 more regular).

    Rescaled so the last request leaves at (n - 1) / rate, as vLLM's client rescales its schedule: the schedule
    offers exactly `rate` whatever the seed (unscaled, "rate 40" offered 37-44 req/s over 100 requests). With a
    `ramp_up`, the same arrivals are spread by the rising rate instead (time-rescaling: a process of unit rate
    mapped through the inverse of the cumulative rate)."""
    rng = np.random.default_rng(seed)
    # burstiness 1 keeps the exponential draws, so a seed sends the schedule it always sent
    gaps = rng.exponential(1.0, size=n) if burstiness == 1 else rng.gamma(burstiness, 1.0 / burstiness, size=n)
    units = np.concatenate([[0.0], np.cumsum(gaps[1:])])[:n]
    if n > 1:
        units *= (n - 1) / units[-1]
    return [_ramp_time(u, rate, ramp_up) for u in units.tolist()] if ramp_up else (units / rate).tolist()


def _ramp_time(arrivals: float, rate: float, ramp: RampUp) -> float:
    """When the cumulative rate of a ramp reaches `arrivals`: the rate climbs from ramp.start_rate to `rate` over
    ramp.duration_s (linearly, or by a constant factor per second), then holds."""
    r0, span = ramp.start_rate, ramp.duration_s
    if r0 == rate:
        return arrivals / rate
    if ramp.strategy == "linear":
        slope = (rate - r0) / span
        during = r0 * span + slope * span ** 2 / 2
        if arrivals <= during:  # r0 t + slope t² / 2 = arrivals
            return (-r0 + math.sqrt(r0 * r0 + 2 * slope * arrivals)) / slope
    else:
        k = math.log(rate / r0) / span
        during = r0 * math.expm1(k * span) / k
        if arrivals <= during:  # r0 (e^(k t) - 1) / k = arrivals
            return math.log1p(k * arrivals / r0) / k
    return span + (arrivals - during) / rate


OPEN_LOOPS = (PoissonLoad, TraceLoad)


def load_width(load: Load) -> int | None:
    """How many requests the load keeps in flight at most; None for an open loop (no bound) or a capacity search
    (each step has its own)."""
    if isinstance(load, (*OPEN_LOOPS, CapacityLoad)):
        return None
    return load.concurrency if isinstance(load, ConcurrencyLoad) else 1


def connections_needed(load: Load, max_concurrency: int | None, latency_s: float | None,
                       share: ClientShare = ClientShare(), rate: float | None = None) -> int:
    """How many connections a client opens before the load: its share of the load's width; for an open loop, twice
    the requests in flight on average (Little's law: rate × latency, `latency_s` from the warm-up) for the bursts.
    `rate`: an open loop's mean rate where the load does not say it (a trace's)."""
    width = load_width(load)
    if width is None:
        width = math.ceil(2 * (rate or getattr(load, "rate", 1.0)) * (latency_s or 1.0)) + 1
    if max_concurrency is not None:
        width = min(width, max_concurrency)
    return max(1, min(share.width(width), MAX_OPEN_CONNECTIONS))


async def sleep_until(t: float) -> None:
    """Until `t` on the cell's clock. The loop's timer is set at `t` moved onto the loop's clock by one shift, read
    once per loop, rather than by a delay from a fresh reading: a preemption between two readings would move one
    request's timer alone, and two requests due 1 ms apart could leave in the wrong order."""
    loop = asyncio.get_running_loop()
    when = t + _shift(loop)
    if when <= loop.time():
        return
    woken = loop.create_future()
    timer = loop.call_at(when, woken.set_result, None)
    try:
        await woken
    finally:
        timer.cancel()


_SHIFTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, float] = weakref.WeakKeyDictionary()


def _shift(loop: asyncio.AbstractEventLoop) -> float:
    """The loop's clock minus the cell's (both monotonic: 0 where they are one clock), read once per loop."""
    if loop not in _SHIFTS:
        _SHIFTS[loop] = loop.time() - now()
    return _SHIFTS[loop]


def trace_rate(arrivals: list[float]) -> float | None:
    """A replayed trace's mean rate (req/s), for sizing the connections."""
    return (len(arrivals) - 1) / arrivals[-1] if len(arrivals) > 1 and arrivals[-1] > 0 else None


async def run_load(load: Load, items: list[T], send: Callable[[T, float], Awaitable[R]], seed: int = 0,
                   max_concurrency: int | None = None, share: ClientShare = ClientShare(),
                   t0: float | None = None, arrivals: list[float] | None = None,
                   stopped: Callable[[], bool] | None = None) -> list[R | None]:
    """Send this client's share of the items under the load pattern, from t0 (default: now); `send(item,
    t_scheduled)`. `arrivals`: a trace's send times (s after t0), one per item. `stopped`: once it says so, an open
    loop sends nothing more (an over-saturation stop). Results come back in item order; None for an item not sent
    before max_duration_s or the stop."""
    mine = share.items(items)
    t0 = now() if t0 is None else t0
    deadline = t0 + load.max_duration_s if load.max_duration_s is not None else math.inf
    if isinstance(load, OPEN_LOOPS):
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def at(t: float, item: T) -> R | None:
            if t > deadline:
                return None
            await sleep_until(t)
            if stopped is not None and stopped():
                return None
            if gate is None:
                return await send(item, t)
            queued = gate.locked()
            async with gate:  # arrived in time: it is served, however long the backend's cap holds it
                if queued:
                    QUEUED_AT.set(t)
                # Waiting for the backend's declared cap is the server's limit, not the client's lag.
                return await send(item, now() if queued else t)

        if isinstance(load, TraceLoad):
            if arrivals is None or len(arrivals) != len(items):
                raise ValueError("a trace load needs one arrival time per item")
            offsets = share.items(arrivals)
        else:
            offsets = share.items(poisson_offsets(len(items), load.rate, seed, load.burstiness, load.ramp_up))
        return list(await asyncio.gather(*(at(t0 + o, it) for o, it in zip(offsets, mine))))

    width = share.width(load_width(load))
    # Every user of the closed loop offers its next request as soon as its last one ended; a backend serving fewer at
    # once gets them queued, and the wait is in the request's latency (t_queued), as a user of that engine waits.
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency is not None and max_concurrency < width else None
    results: list[R | None] = [None] * len(mine)
    queue = iter(enumerate(mine))

    async def worker() -> None:
        await sleep_until(t0)
        for i, item in queue:  # a shared iterator: each worker takes the next item as soon as it is free
            if now() > deadline:
                return
            if gate is None:
                results[i] = await send(item, now())
                continue
            offered, queued = now(), gate.locked()
            async with gate:
                QUEUED_AT.set(offered if queued else None)  # this task's next request may not wait
                results[i] = await send(item, now())

    await asyncio.gather(*(worker() for _ in range(min(width, len(mine)))))
    return results
