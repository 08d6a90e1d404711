"""Sends one run of a load (a repetition, or a capacity step): asks its strategy (harness/run/strategies.py) which item
is due next and when, waits until then and sends it, without waiting for the items before it to end.

A backend that serves fewer requests at once than the load asks (Capabilities.max_concurrency) gets them queued here:
at most that many are in flight, the others wait their turn (open and closed loops alike: the load offered is the
same for every backend), each request's wait is recorded (t_queued) and counted in its latency, and the worker
records the cap in the results.

Every item is handed to `send` with its Due: the time it was meant to leave (its scheduled time, on the cell's clock
`harness.core.events.now`; the reducer reports the dispatch lag, schedule → send, and the achieved rate from it), and
when it was offered if it then waited for the backend. With `load.clients: N` the load is split across N client
processes: each runs `run_load` on its `ClientShare`.

With `max_duration_s` no item arrives (open loop) or leaves (closed loop) later than that after t0: the ones in
flight then finish and are measured (cutting them would record failures the engine did not make), as do those that
arrived in time and wait for a backend's max_concurrency; the ones not sent come back as None.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

from harness.core.events import now
from harness.run.strategies import ClientShare, InFlight, Paced

R = TypeVar("R")
T = TypeVar("T")

MAX_OPEN_CONNECTIONS = 256


@dataclass(frozen=True)
class Due:
    """When an item leaves: `t_scheduled`, the time the load meant; `t_queued`, when it was offered, if it then waited
    for the backend's max_concurrency (a user of the engine waits that long too, so its latencies count it, though it
    is not the client's dispatch lag)."""
    t_scheduled: float
    t_queued: float | None = None


def connections_needed(strategy: Paced, max_concurrency: int | None, latency_s: float | None,
                       share: ClientShare = ClientShare(), arrivals: list[float] | None = None) -> int:
    """How many connections a client opens before the load: its share of the load's width; for an open loop, twice
    the requests in flight on average (Little's law: rate × latency, `latency_s` from the warm-up) for the bursts."""
    width = strategy.width
    if width is None:
        width = math.ceil(2 * strategy.mean_rate(arrivals) * (latency_s or 1.0)) + 1
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


async def run_load(strategy: Paced, items: list[T], send: Callable[[T, Due], Awaitable[R]], seed: int = 0,
                   max_concurrency: int | None = None, share: ClientShare = ClientShare(),
                   t0: float | None = None, arrivals: list[float] | None = None,
                   stopped: Callable[[], bool] | None = None) -> list[R | None]:
    """Send this client's share of the items on the strategy's schedule, from t0 (default: now). `arrivals`: a
    trace's send times (s after t0), one per item. `stopped`: once it says so, nothing more is sent (an
    over-saturation stop). Results come back in item order; None for an item not sent before max_duration_s or the
    stop."""
    mine = share.items(items)
    t0 = now() if t0 is None else t0
    deadline = t0 + strategy.max_duration_s if strategy.max_duration_s is not None else math.inf
    lanes = share.width(strategy.width) if strategy.width is not None else None
    # Every item the load offers is sent once the backend has room: the wait is in its latency (t_queued), as a user
    # of that engine waits.
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency is not None and (
        lanes is None or max_concurrency < lanes) else None
    flight = InFlight()
    results: list[R | None] = [None] * len(mine)
    tasks: list[asyncio.Task[None]] = []
    failed: list[asyncio.Task[None]] = []

    async def one(i: int, t: float) -> None:
        try:
            if gate is None:
                results[i] = await send(mine[i], Due(t))
                return
            queued = gate.locked()
            async with gate:  # due in time: it is served, however long the backend's cap holds it
                results[i] = await send(mine[i], Due(now(), t) if queued else Due(t))
        finally:
            flight.end()

    def ended(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            failed.append(task)

    try:
        async with aclosing(strategy.schedule(len(items), share, t0, seed, arrivals, flight)) as schedule:
            async for i, t in schedule:
                if t > deadline or failed:
                    break
                await sleep_until(t)
                if stopped is not None and stopped():
                    break
                flight.start()
                tasks.append(asyncio.create_task(one(i, t)))
                tasks[-1].add_done_callback(ended)
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:  # after an error or a cancellation nothing of the run is left sending
            task.cancel()
    return results
