"""Loads as strategies (the shape of GuideLLM's scheduler strategies): each `load.type` of the scenario is one class
here that says what is sent next and when. The worker asks it, and harness/run/loadgen.py sends.

    LoadStrategy              a cell's runs: `drive` hands the worker's run() each run's schedule, `runs` says at
    │                         most how many, `measured` which records the cell's metrics describe
    ├─ Paced                  one schedule, sent every repetition: `width` (requests in flight at most; None for
    │  │                      an open loop) and `schedule`, the (item, due time) pairs of a run
    │  ├─ ClosedLoop          lanes, each offering its next item as soon as its last one ended
    │  │  ├─ SequentialStrategy      one lane
    │  │  └─ ConcurrentStrategy      `concurrency` lanes
    │  └─ OpenLoop            each item due at its offset from the run's start, whatever completes
    │     ├─ PoissonStrategy         exponential or gamma gaps (burstiness), a ramp-up, an over-saturation stop
    │     └─ TraceStrategy           a recorded trace's arrival times
    └─ CapacityStrategy       a search whose next step (a Poisson or closed-loop run) depends on the steps before

What the strategies schedule are items: a request, or a conversation's session (harness/run/conversation.py), whose
turns follow one another inside it. With `load.clients: N` (or generators) each client sends its ClientShare of the
one schedule.
"""

from __future__ import annotations

import asyncio
import math
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from harness.config.generators import senders
from harness.config.scenario import (SLO, CapacityLoad, ConcurrencyLoad, Load, PoissonLoad, SequentialLoad,
                                     TraceLoad)
from harness.config.shapes import OversaturationStop, RampUp
from harness.core.errors import BackendError
from harness.core.events import now
from harness.records import CapacityResult, CapacityStep, RequestRecord, WorkerReport
from harness.results.capacity import met_slo, operating_point, reduce_capacity, step_passes
from harness.run.capacity import CapacitySearch

T = TypeVar("T")


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

    def size(self, n: int) -> int:
        """How many of n items are this client's."""
        return len(range(self.index, n, self.count))


class InFlight:
    """How many items of a run are in flight: the driver counts them, a closed loop waits here for a free lane."""

    def __init__(self) -> None:
        self.count = 0
        self._ended = asyncio.Event()

    def start(self) -> None:
        self.count += 1

    def end(self) -> None:
        self.count -= 1
        self._ended.set()

    async def below(self, n: int) -> None:
        while self.count >= n:
            self._ended.clear()
            await self._ended.wait()


@dataclass
class RunOutcome:
    """One run (a repetition or a capacity step) as the worker sent it: the records of the requests sent, how many
    max_duration_s or a stop kept from leaving, and its span on the cell's clock."""
    records: list[RequestRecord]
    not_sent: int
    start: float
    end: float


# The worker's run: (index of the run, its schedule, whether every request failing is an outcome rather than a broken
# engine) → what it sent.
Run = Callable[[int, "Paced", bool], Awaitable[RunOutcome]]


@dataclass
class Measured:
    """What a cell's metrics are reduced from: records and loop lags as `repetitions` runs of `load`, and a capacity
    search's result beside them."""
    records: list[RequestRecord]
    loop_lag_ms: list[list[float]]
    load: Load
    repetitions: int
    capacity: CapacityResult | None = None


class LoadStrategy(ABC):
    """A load type, over a whole cell."""
    width: int | None = None  # requests in flight at most; None: no fixed bound (an open loop, a capacity search)

    def __init__(self, load: Load):
        self.load = load

    def runs(self, repetitions: int) -> int:
        """At most how many runs the cell sends, each its own num_requests."""
        return repetitions

    @abstractmethod
    async def drive(self, run: Run, repetitions: int, max_concurrency: int | None,
                    backend: str) -> list[CapacityStep]:
        """Send the cell's runs through `run`; the steps a search took (none for a load that only repeats).
        `max_concurrency`: the backend's (Capabilities), `backend` its kind, for what a load cannot do with it."""

    def measured(self, records: list[RequestRecord], report: WorkerReport, repetitions: int) -> Measured:
        """The records the cell's metrics describe: every repetition's."""
        return Measured(records, report.loop_lag_ms, self.load, repetitions)


class Paced(LoadStrategy):
    """A load that sends every repetition on one schedule."""
    stop: OversaturationStop | None = None  # end a run once the engine is over-saturated (harness/run/saturation.py)

    def __init__(self, load: SequentialLoad | ConcurrencyLoad | PoissonLoad | TraceLoad):
        super().__init__(load)
        self.max_duration_s = load.max_duration_s
        self.senders = senders(load)

    async def drive(self, run: Run, repetitions: int, max_concurrency: int | None,
                    backend: str) -> list[CapacityStep]:
        for rep in range(repetitions):
            await run(rep, self, False)
        return []

    @abstractmethod
    def schedule(self, n: int, share: ClientShare, t0: float, seed: int, arrivals: list[float] | None,
                 flight: InFlight) -> AsyncGenerator[tuple[int, float], None]:
        """A run of n items from t0, this client's share of it: (index among the share's items, when it is due), in
        the order they leave. `arrivals`: a trace's send times (s after t0), one per item; `flight`: the run's
        items in flight, for a closed loop to wait on."""

    def mean_rate(self, arrivals: list[float] | None) -> float:
        """An open loop's mean rate (req/s), which sizes its connections."""
        return 1.0


class ClosedLoop(Paced):
    """`width` lanes, each offering its next item as soon as its last one ended."""
    width: int

    def __init__(self, load: SequentialLoad | ConcurrencyLoad, width: int):
        super().__init__(load)
        self.width = width

    async def schedule(self, n: int, share: ClientShare, t0: float, seed: int, arrivals: list[float] | None,
                       flight: InFlight) -> AsyncGenerator[tuple[int, float], None]:
        lanes = share.width(self.width)
        for i in range(share.size(n)):
            await flight.below(lanes)
            yield i, max(t0, now())


class SequentialStrategy(ClosedLoop):
    """`sequential`: one request at a time."""

    def __init__(self, load: SequentialLoad):
        super().__init__(load, 1)


class ConcurrentStrategy(ClosedLoop):
    """`concurrency`: that many in flight."""

    def __init__(self, load: ConcurrencyLoad):
        assert isinstance(load.concurrency, int), "a swept concurrency is expanded into cells first"
        super().__init__(load, load.concurrency)


class OpenLoop(Paced):
    """Each item due at its offset from the run's start, whatever completes."""

    def __init__(self, load: PoissonLoad | TraceLoad):
        super().__init__(load)
        self.stop = load.oversaturation_stop

    @abstractmethod
    def offsets(self, n: int, seed: int, arrivals: list[float] | None) -> list[float]:
        """The whole run's send times, s after its start, one per item."""

    async def schedule(self, n: int, share: ClientShare, t0: float, seed: int, arrivals: list[float] | None,
                       flight: InFlight) -> AsyncGenerator[tuple[int, float], None]:
        offsets = share.items(self.offsets(n, seed, arrivals))
        for i in sorted(range(len(offsets)), key=offsets.__getitem__):
            yield i, t0 + offsets[i]


class PoissonStrategy(OpenLoop):
    """`poisson`: arrivals at `rate`, with its burstiness and ramp-up."""

    def __init__(self, load: PoissonLoad):
        assert not isinstance(load.rate, list), "a swept rate is expanded into cells first"
        super().__init__(load)
        self.rate, self.burstiness, self.ramp_up = load.rate, load.burstiness, load.ramp_up

    def offsets(self, n: int, seed: int, arrivals: list[float] | None) -> list[float]:
        return poisson_offsets(n, self.rate, seed, self.burstiness, self.ramp_up)

    def mean_rate(self, arrivals: list[float] | None) -> float:
        return self.rate


class TraceStrategy(OpenLoop):
    """`trace`: each request at its row's time (already sped up: harness/inputs/trace.py)."""

    def offsets(self, n: int, seed: int, arrivals: list[float] | None) -> list[float]:
        if arrivals is None or len(arrivals) != n:
            raise ValueError("a trace load needs one arrival time per item")
        return arrivals

    def mean_rate(self, arrivals: list[float] | None) -> float:
        return (trace_rate(arrivals) if arrivals else None) or 1.0


class CapacityStrategy(LoadStrategy):
    """`capacity`: steps at the rate or concurrency the search chooses from the steps before (harness/run/capacity.py),
    each judged by the scenario's slo; it runs once per cell, whatever `repetitions` says."""

    def __init__(self, load: CapacityLoad, slo: SLO):
        super().__init__(load)
        self.spec, self.slo = load, slo

    def runs(self, repetitions: int) -> int:
        # Each step gets requests of its own, so no step finds the one before it in a prefix cache.
        return self.spec.max_steps

    def step(self, value: float) -> Paced:
        """The run one step sends: Poisson arrivals at `value` req/s, or `value` requests in flight."""
        load = self.spec
        if load.search == "rate":
            return PoissonStrategy(PoissonLoad(type="poisson", rate=value, max_duration_s=load.max_duration_s))
        return ConcurrentStrategy(ConcurrencyLoad(type="concurrency", concurrency=int(value),
                                                  max_duration_s=load.max_duration_s))

    async def drive(self, run: Run, repetitions: int, max_concurrency: int | None,
                    backend: str) -> list[CapacityStep]:
        load = self.spec
        if load.search == "concurrency" and max_concurrency is not None:
            # The harness would hold all but max_concurrency back, and every step would measure the same.
            raise BackendError(f"load.search: concurrency needs an engine that serves requests at once; {backend} "
                               f"serves {max_concurrency} at a time: search the rate instead")
        search = CapacitySearch(load)
        steps: list[CapacityStep] = []
        while (value := search.next()) is not None:
            index = len(steps)
            # A step past the knee may fail every request: a failed step, not a broken engine (unless it is the first).
            out = await run(index, self.step(value), index > 0)
            met = met_slo(out.records, self.slo)
            passed = step_passes(met, len(out.records), load.attainment)
            steps.append(CapacityStep(step=index, value=value, start=out.start, end=out.end, sent=len(out.records),
                                      not_sent=out.not_sent, met=met, passed=passed))
            search.record(value, passed)
        return steps

    def measured(self, records: list[RequestRecord], report: WorkerReport, repetitions: int) -> Measured:
        """The step at the capacity, as the cell's one repetition; every step is in `capacity`."""
        capacity = reduce_capacity(records, report.capacity_steps, self.spec, self.slo)
        records, lags, load = operating_point(records, capacity, report.loop_lag_ms)
        return Measured(records, lags, load, 1, capacity)


def strategy_for(load: Load, slo: SLO | None = None) -> LoadStrategy:
    """The strategy of a scenario's load; `slo` judges a capacity search's steps."""
    if isinstance(load, SequentialLoad):
        return SequentialStrategy(load)
    if isinstance(load, ConcurrencyLoad):
        return ConcurrentStrategy(load)
    if isinstance(load, PoissonLoad):
        return PoissonStrategy(load)
    if isinstance(load, TraceLoad):
        return TraceStrategy(load)
    return CapacityStrategy(load, slo or SLO())


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


def trace_rate(arrivals: list[float]) -> float | None:
    """A replayed trace's mean rate (req/s)."""
    return (len(arrivals) - 1) / arrivals[-1] if len(arrivals) > 1 and arrivals[-1] > 0 else None
