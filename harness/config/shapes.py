"""The load shapes peers offer, beyond a steady rate: a ramp-up to the rate (vLLM's --ramp-up-strategy, GuideLLM's
rampup), a stop once the engine is over-saturated (GuideLLM's), and the steady-state window that metrics are taken
over (GuideLLM's warm-up and cool-down). Bursty arrivals are PoissonLoad.burstiness (vLLM's --burstiness)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from harness.core.spec import Strict


class RampUp(Strict):
    """The arrival rate climbs from start_rate to the load's rate over duration_s, then holds it."""
    strategy: Literal["linear", "exponential"] = Field(
        "linear", description="linear: the rate rises by equal steps per second; exponential: by an equal factor")
    start_rate: float = Field(gt=0, description="req/s when the repetition starts")
    duration_s: float = Field(gt=0, description="seconds until the load's rate is reached")


class OversaturationStop(Strict):
    """End a repetition early once the engine cannot keep up: the requests in flight and their TTFT both keep
    rising. Requests not yet sent are counted in not_sent; those in flight finish and are measured."""
    min_s: float = Field(5.0, gt=0, description="never stop before this many seconds into a repetition")
    min_growth: float = Field(2.0, gt=1, description="both the requests in flight and the TTFT must have grown "
                                                     "this many times over the repetition (their fitted trend)")
    alpha: float = Field(0.01, gt=0, lt=0.5, description="and both trends must rise with significance at this "
                                                         "level (one-sided test of the regression slope)")


class SteadyState(Strict):
    """Metrics over the middle of each repetition: requests scheduled in its first skip_start_s seconds (a warm-up,
    a ramp-up) or its last skip_end_s seconds (the drain) are left out of every metric (requests.jsonl keeps them)."""
    skip_start_s: float = Field(0.0, ge=0, description="seconds from the repetition's first scheduled send")
    skip_end_s: float = Field(0.0, ge=0, description="seconds before its last scheduled send")

    @model_validator(mode="after")
    def _something_skipped(self) -> SteadyState:
        if self.skip_start_s == 0 and self.skip_end_s == 0:
            raise ValueError("give skip_start_s or skip_end_s (seconds left out at either end)")
        return self
