"""Verdicts as data: which backend is best on one statistic and whether that is beyond noise (the report's verdict
table), and how one backend compares with another (the guide's margins). Each holds the numbers it was decided on,
the values and their 95% CIs, and is put in words only when it is rendered (`detail`, `text`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from harness.results.catalogue import Statistic, fmt_interval, fmt_value, statistic


class MeasuredValue(BaseModel):
    """One backend's number: its label, value and 95% CI, and whether its cell's repetitions disagree."""
    backend: str
    value: float
    ci: tuple[float, float] | None = None
    unstable: bool = False

    def text(self, unit: str) -> str:
        """The value, with its 95% CI where there is one: the reader sees which differences are noise."""
        return fmt_value(self.value, unit) + (f" {fmt_interval(self.ci, unit, self.value)}" if self.ci else "")


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


class Verdict(BaseModel):
    """The best ok cell on one statistic of one workload, against the others measured there (best first). Beyond
    noise when its 95% CI and the runner-up's do not overlap; unstable cells are left out of the comparison, and an
    unstable best decides nothing."""
    metric: str  # the statistic's catalogue name, e.g. "ttft_ms.p50"
    measured: list[MeasuredValue]  # best first

    @property
    def statistic(self) -> Statistic:
        return statistic(self.metric)

    @property
    def best(self) -> MeasuredValue:
        return self.measured[0]

    @property
    def rest(self) -> list[MeasuredValue]:
        """The others that are compared: those whose repetitions agree."""
        return [x for x in self.measured[1:] if not x.unstable]

    @property
    def left_out(self) -> list[str]:
        return [x.backend for x in self.measured[1:] if x.unstable]

    @property
    def tied(self) -> list[str]:
        """The backends within noise of the best: their CIs overlap its."""
        ci = self.best.ci
        return [x.backend for x in self.rest if ci is not None and x.ci is not None and overlap(ci, x.ci)]

    @property
    def kind(self) -> Literal["beyond", "tie", "undecided", "alone"]:
        if self.best.unstable:
            return "undecided"
        if not self.rest:
            return "alone"
        if self.best.ci is None or self.rest[0].ci is None:
            return "undecided"
        return "tie" if self.tied else "beyond"

    # ---- in words ------------------------------------------------------------------------------------------
    @property
    def winner(self) -> str:
        return self.best.backend

    @property
    def value(self) -> str:
        return fmt_value(self.best.value, self.statistic.unit)

    def margin(self, other: MeasuredValue) -> str:
        """How far the best is ahead of `other`: "41% lower than own", "2.3× own's"."""
        v, rv, name = self.best.value, other.value, other.backend
        if rv == v:
            return f"equal to {name}"
        if self.statistic.better == "lower":
            return f"{(1 - v / rv) * 100:.0f}% lower than {name}" if rv else f"lower than {name}"
        if not rv:
            return f"higher than {name}"
        return f"{v / rv:.1f}× {name}'s" if v / rv >= 2 else f"{(v / rv - 1) * 100:.0f}% higher than {name}"

    @property
    def detail(self) -> str:
        """"41% lower than own; beyond noise", "tie within noise with own (3% lower than own)", ..."""
        best, kind = self.best, self.kind
        if best.unstable:
            ahead = f"{self.margin(self.measured[1])}; " if len(self.measured) > 1 else ""
            return f"{ahead}not decided: {best.backend} is unstable"
        aside = f"; {', '.join(self.left_out)} unstable, left out" if self.left_out else ""
        if kind == "alone":
            return f"the only backend measured{aside}"
        margin = self.margin(self.rest[0])
        if kind == "undecided":
            return f"{margin}; no CI in these results{aside}"
        if kind == "tie":
            return f"tie within noise with {', '.join(self.tied)} ({margin}){aside}"
        return f"{margin}; beyond noise{aside}"


class Comparison(BaseModel):
    """Backend `a` against backend `b` on one statistic, with both 95% CIs."""
    metric: str  # the statistic's catalogue name
    a: MeasuredValue
    b: MeasuredValue

    @property
    def statistic(self) -> Statistic:
        return statistic(self.metric)

    @property
    def within_noise(self) -> bool | None:
        """Whether the CIs overlap; None without both."""
        return None if self.a.ci is None or self.b.ci is None else overlap(self.a.ci, self.b.ci)

    @property
    def a_worse_beyond_noise(self) -> bool:
        if self.a.ci is None or self.b.ci is None:
            return False
        return self.a.ci[0] > self.b.ci[1] if self.statistic.better == "lower" else self.a.ci[1] < self.b.ci[0]

    @property
    def text(self) -> str:
        """"output tok/s 277 [270–280] vs 236 [230–240], 17% higher, beyond noise"."""
        s, va, vb = self.statistic, self.a.value, self.b.value
        if vb == va or not vb:
            diff = "equal" if vb == va else ""
        else:
            ratio = va / vb
            diff = f"{abs(ratio - 1) * 100:.0f}% {'higher' if ratio > 1 else 'lower'}"
        within = self.within_noise
        noise = "no CI" if within is None else "within noise" if within else "beyond noise"
        return f"{s.label} {self.a.text(s.unit)} vs {self.b.text(s.unit)}" + "".join(
            f", {x}" for x in (diff, noise) if x)
