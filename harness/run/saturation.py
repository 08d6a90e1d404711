"""The over-saturation stop (`load.oversaturation_stop`, after GuideLLM's): a repetition of an open loop ends early
once the engine cannot keep up, rather than queueing requests for minutes to measure only its queue.

Over-saturated, an engine's queue grows without bound: the requests in flight and their TTFT rise together. The
watch samples the requests in flight four times a second and takes each finished request's TTFT at its send; from
`min_s` on, it stops the load when both rise (regression slope over the repetition so far, one-sided p < alpha) and
both have grown `min_growth` times (the mean of the last quarter of their samples over the first quarter's; requests
in flight counted from at least one). A stable engine's two trends stay flat, whatever its latency.
"""

from __future__ import annotations

import asyncio

import numpy as np

from harness.config.shapes import OversaturationStop
from harness.core.events import now
from harness.records import RequestRecord

SAMPLE_S = 0.25
MIN_POINTS = 8  # of each series, before a trend is judged


class SaturationWatch:
    """One repetition's watch, made before its load starts: `sent` and `done` around each request, `run(t0)` beside
    the load, `stopped` for the load generator; `reason` says why it stopped (None: it did not)."""

    def __init__(self, rule: OversaturationStop):
        from scipy.stats import linregress  # here: scipy.stats takes seconds to import, only these cells pay it

        self.rule, self._linregress = rule, linregress
        self.in_flight = 0
        self.flight: list[tuple[float, float]] = []  # (time, requests in flight)
        self.ttft: list[tuple[float, float]] = []  # (send, TTFT s) of each finished request
        self.reason: str | None = None

    def sent(self) -> None:
        self.in_flight += 1

    def done(self, rec: RequestRecord | None) -> None:
        self.in_flight -= 1
        if rec is not None and rec.ok:
            self.ttft.append((rec.t_send, rec.ttft))

    def stopped(self) -> bool:
        return self.reason is not None

    async def run(self, t0: float) -> None:
        """From t0, the repetition's start, until it stops the load (cancelled when the load ends first)."""
        while self.reason is None:
            await asyncio.sleep(SAMPLE_S)
            t = now()
            if t < t0:
                continue
            self.flight.append((t, float(self.in_flight)))
            if t - t0 >= self.rule.min_s:
                self.reason = self.judge(t - t0)

    def judge(self, elapsed: float) -> str | None:
        """Why the engine is over-saturated now, or None."""
        found = []
        for name, points, floor in (("requests in flight", self.flight, 1.0), ("TTFT", self.ttft, 0.0)):
            if len(points) < MIN_POINTS:
                return None
            x, y = np.array(points).T
            fit = self._linregress(x, y, alternative="greater")
            quarter = len(y) // 4
            first, last = max(float(y[:quarter].mean()), floor), float(y[-quarter:].mean())
            if not (fit.pvalue < self.rule.alpha and first > 0 and last >= self.rule.min_growth * first):
                return None
            found.append(f"{name} rose {last / first:.1f}× (p = {fit.pvalue:.2g})")
        return f"over-saturated after {elapsed:.1f} s: {' and '.join(found)}; the rest of the load was not sent"
