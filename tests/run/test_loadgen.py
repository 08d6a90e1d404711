"""Load patterns send requests when they should."""

import asyncio

import pytest

from harness.core.events import now
from harness.run.loadgen import connections_needed, run_load
from harness.run.strategies import ClientShare, poisson_offsets, strategy_for
from harness.config.scenario import ConcurrencyLoad, PoissonLoad, SequentialLoad


async def test_poisson_rate_is_achieved():
    rate, n = 100.0, 400
    sent, scheduled = [], []

    async def send(i, due):
        sent.append(now())
        scheduled.append(due.t_scheduled)
        await asyncio.sleep(0.05)  # open loop: slow responses must not slow arrivals
        return i

    t0 = now()
    out = await run_load(strategy_for(PoissonLoad(type="poisson", rate=rate)), list(range(n)), send, seed=3, t0=t0)
    assert out == list(range(n))
    offsets = poisson_offsets(n, rate, 3)
    assert scheduled == pytest.approx([t0 + o for o in offsets], abs=1e-9)  # each is told when it was due
    # the achieved rate is the schedule's, and the schedule's is exactly the target (rescaled, as vLLM's client does)
    achieved = (n - 1) / (sent[-1] - sent[0])
    assert (n - 1) / offsets[-1] == pytest.approx(rate, rel=1e-9)
    assert achieved == pytest.approx(rate, rel=0.02)
    # each request left when scheduled, not when the one before it finished
    # (a closed loop would fall seconds behind; bounds leave room for a busy machine)
    lateness = sorted(s - t for s, t in zip(sent, scheduled))
    assert lateness[0] >= 0 and lateness[len(lateness) // 2] < 0.01 and lateness[-1] < 0.25


def test_poisson_schedules_are_seeded_and_offer_exactly_the_rate():
    a, b = poisson_offsets(400, 4.0, 7), poisson_offsets(400, 4.0, 7)
    assert a == b and a != poisson_offsets(400, 4.0, 8)
    # whatever the seed, 100 requests "at 40 req/s" offer 40 req/s (unscaled they offered 37-44)
    assert all(99 / poisson_offsets(100, 40.0, seed)[-1] == pytest.approx(40.0, rel=1e-9) for seed in range(20))
    assert poisson_offsets(1, 5.0, 0) == [0.0]
    gaps = [y - x for x, y in zip(a, a[1:])]
    # exponential gaps: the standard deviation equals the mean
    mean = sum(gaps) / len(gaps)
    std = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5
    assert std == pytest.approx(mean, rel=0.15)


@pytest.mark.parametrize("load,width", [(SequentialLoad(), 1), (ConcurrencyLoad(type="concurrency", concurrency=3), 3)])
async def test_closed_loop_keeps_exactly_width_in_flight(load, width):
    in_flight, peak = 0, 0

    async def send(i, due):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01 * (1 + i % 3))
        in_flight -= 1
        return i * 2

    out = await run_load(strategy_for(load), list(range(10)), send)
    assert out == [i * 2 for i in range(10)] and peak == width


@pytest.mark.parametrize("load", [PoissonLoad(type="poisson", rate=400.0),
                                  ConcurrencyLoad(type="concurrency", concurrency=5)])
async def test_client_shares_send_every_item_once_on_the_one_schedule(load):
    items, count = list(range(23)), 3
    sent: dict[int, float] = {}
    widths = []

    async def run(share):
        in_flight, peak = 0, 0

        async def send(i, due):
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            sent[i] = due.t_scheduled
            await asyncio.sleep(0.005)
            in_flight -= 1
            return i

        out = await run_load(strategy_for(load), items, send, seed=1, share=share, t0=t0)
        widths.append(peak)
        return out

    t0 = now() + 0.02
    outs = await asyncio.gather(*(run(ClientShare(k, count)) for k in range(count)))
    assert outs == [items[k::count] for k in range(count)] and sorted(sent) == items
    if isinstance(load, PoissonLoad):
        # together they keep the single-process schedule, request by request
        assert [sent[i] for i in items] == pytest.approx([t0 + o for o in poisson_offsets(len(items), 400.0, 1)])
    else:
        assert sorted(widths) == [1, 2, 2]  # the concurrency of 5 split 2 + 2 + 1
        assert min(sent.values()) >= t0  # nobody starts before the common start


def test_connections_opened_before_the_load():
    eight = strategy_for(ConcurrencyLoad(type="concurrency", concurrency=8))
    assert connections_needed(eight, None, None) == 8
    assert connections_needed(eight, 2, None) == 2
    assert connections_needed(eight, None, None, ClientShare(2, 3)) == 2
    # open loop: twice the requests in flight on average (rate × latency), for the bursts
    assert connections_needed(strategy_for(PoissonLoad(type="poisson", rate=40)), None, 0.1) == 9
    assert connections_needed(strategy_for(SequentialLoad()), None, 5.0) == 1


@pytest.mark.parametrize("load", [ConcurrencyLoad(type="concurrency", concurrency=3),
                                  PoissonLoad(type="poisson", rate=1000.0)])
async def test_a_backend_that_serves_one_at_a_time_gets_the_rest_queued_with_their_offer_time(load):
    """Requests beyond the backend's max_concurrency wait for it; each one that waited is told when it was offered
    (its Due.t_queued, the start of the wait its latency counts) and leaves when the one before it ends."""
    dues, ended, in_flight, peak = {}, {}, 0, 0

    async def send(i, due):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        dues[i] = due
        await asyncio.sleep(0.01)
        ended[i] = now()
        in_flight -= 1
        return i

    out = await run_load(strategy_for(load), list(range(6)), send, seed=2, max_concurrency=1)
    assert out == list(range(6)) and peak == 1
    assert dues[0].t_queued is None  # the first found the backend free
    waited = [i for i in range(6) if dues[i].t_queued is not None]
    assert len(waited) >= 4  # the load offers them faster than one at a time serves them
    for i in waited:
        # offered first, sent once the backend had room: right after the request before it in the queue ended
        assert dues[i].t_queued < dues[i].t_scheduled
        assert any(0 <= dues[i].t_scheduled - end < 0.01 for end in ended.values())


@pytest.mark.parametrize("load", [ConcurrencyLoad(type="concurrency", concurrency=2),
                                  PoissonLoad(type="poisson", rate=200.0)])
async def test_a_send_that_raises_ends_the_run_with_its_error(load):
    """A harness error (not a failed request, which send records) stops the schedule: nothing more is sent, nothing
    of the run is left sending, and the error is the one raised."""
    sent = []

    async def send(i, due):
        sent.append(i)
        await asyncio.sleep(0.01)
        if i == 3:
            raise RuntimeError("the harness broke")
        return i

    with pytest.raises(RuntimeError, match="the harness broke"):
        await run_load(strategy_for(load), list(range(100)), send, seed=1)
    count = len(sent)
    await asyncio.sleep(0.05)
    assert 4 <= count < 30 and len(sent) == count  # not the 100 of a run that went on
