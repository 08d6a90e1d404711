"""The capacity search's steps (`load: {type: capacity}`): which rate or concurrency each step offers, from the passes
and fails of the steps before it. Bracketing from `start` (doubling while steps pass, halving while they fail), then
bisection until the highest passing and lowest failing values are at most `tolerance` apart, or `max_steps` ran.

harness/run/strategies.py's CapacityStrategy drives the steps in the one engine start, each judged by
harness/results/capacity.py's `attainment` against the scenario's slo.
"""

from __future__ import annotations

import math

from harness.config.scenario import CapacityLoad


class CapacitySearch:
    def __init__(self, load: CapacityLoad):
        self.load = load
        self.integer = load.search == "concurrency"
        self.passed: float | None = None  # the highest value that passed
        self.failed: float | None = None  # the lowest value that failed
        self.tried: list[tuple[float, bool]] = []

    def next(self) -> float | None:
        """The value the next step offers; None when the search is over."""
        if len(self.tried) >= self.load.max_steps:
            return None
        if not self.tried:
            return self._round(self.load.start)
        lo, hi = self.passed, self.failed
        if hi is None:  # every step passed: no upper bound yet
            assert lo is not None
            return self._round(lo * 2)
        if lo is None:  # every step failed: look lower, down to the resolution
            half = self._round(hi / 2)
            return half if half < hi and half >= self._finest() else None
        if hi - lo <= max(self.load.tolerance, self._finest() if self.integer else 0.0):
            return None
        mid = self._round((lo + hi) / 2)
        return mid if lo < mid < hi else None

    def record(self, value: float, passed: bool) -> None:
        self.tried.append((value, passed))
        if passed:
            self.passed = value if self.passed is None else max(self.passed, value)
        else:
            self.failed = value if self.failed is None else min(self.failed, value)

    def _finest(self) -> float:
        # A rate goes no lower than the tolerance: below it, "no capacity" is the answer at this resolution.
        return 1.0 if self.integer else self.load.tolerance

    def _round(self, value: float) -> float:
        return float(max(1, math.floor(value))) if self.integer else value
