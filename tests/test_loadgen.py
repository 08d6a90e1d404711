"""Load patterns send requests when they should."""

import asyncio

import pytest

from harness.run.loadgen import poisson_offsets, run_load
from harness.config.scenario import ConcurrencyLoad, PoissonLoad, SequentialLoad


async def test_poisson_rate_is_achieved():
    rate, n = 100.0, 400
    loop = asyncio.get_running_loop()
    sent = []

    async def send(i):
        sent.append(loop.time())
        await asyncio.sleep(0.05)  # open loop: slow responses must not slow arrivals
        return i

    out = await run_load(PoissonLoad(type="poisson", rate=rate), list(range(n)), send, seed=3)
    assert out == list(range(n))
    offsets = poisson_offsets(n, rate, 3)
    # the achieved rate is the schedule's, and the schedule's is the target up to sampling noise (~5% at n=400)
    achieved = (n - 1) / (sent[-1] - sent[0])
    assert achieved == pytest.approx((n - 1) / offsets[-1], rel=0.01)
    assert achieved == pytest.approx(rate, rel=0.12)
    # each request left when scheduled, not when the one before it finished
    # (a closed loop would fall seconds behind; bounds leave room for a busy machine)
    lateness = sorted(s - sent[0] - o for s, o in zip(sent, offsets))
    assert lateness[len(lateness) // 2] < 0.01 and lateness[-1] < 0.25


def test_poisson_schedules_are_seeded_and_average_to_the_rate():
    a, b = poisson_offsets(400, 4.0, 7), poisson_offsets(400, 4.0, 7)
    assert a == b and a != poisson_offsets(400, 4.0, 8)
    rates = [399 / poisson_offsets(400, 4.0, seed)[-1] for seed in range(10)]
    assert sum(rates) / len(rates) == pytest.approx(4.0, rel=0.04)
    gaps = [y - x for x, y in zip(a, a[1:])]
    # exponential gaps: the standard deviation equals the mean
    mean = sum(gaps) / len(gaps)
    std = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5
    assert std == pytest.approx(mean, rel=0.15)


@pytest.mark.parametrize("load,width", [(SequentialLoad(), 1), (ConcurrencyLoad(type="concurrency", concurrency=3), 3)])
async def test_closed_loop_keeps_exactly_width_in_flight(load, width):
    in_flight, peak = 0, 0

    async def send(i):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01 * (1 + i % 3))
        in_flight -= 1
        return i * 2

    out = await run_load(load, list(range(10)), send)
    assert out == [i * 2 for i in range(10)] and peak == width
