"""The multi-turn prompt source (`prompts: {type: conversation}`), schema only: the first turns are built by
harness/inputs/conversation.py, the later ones by the worker, which carries each real answer into the next turn."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from harness.config.prompts import LengthDist
from harness.core.spec import Strict


class ThinkTime(Strict):
    """The user's pause before each later turn, drawn per turn (seeded)."""
    dist: Literal["uniform", "exponential", "fixed"] = Field(
        description="uniform: from min to max; exponential: of mean `mean`, cut to [min, max]; fixed: mean")
    mean: float | None = Field(None, ge=0, description="seconds (exponential, fixed)")
    min: float = Field(0.0, ge=0, description="seconds; no pause is shorter")
    max: float | None = Field(None, ge=0, description="seconds; no pause is longer (required for uniform)")

    @model_validator(mode="after")
    def _parameters(self) -> ThinkTime:
        need = {"uniform": ("max",), "exponential": ("mean",), "fixed": ("mean",)}[self.dist]
        missing = [k for k in need if getattr(self, k) is None]
        if missing:
            raise ValueError(f"dist {self.dist} needs {' and '.join(missing)}")
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self


class ConversationPrompts(Strict):
    """Multi-turn chat sessions. Each turn sends the whole history (in the model's chat template where its tokenizer
    has one, else `User:` / `Assistant:` lines) plus a new user message of `input_tokens` tokens; the model's real
    answer of each turn is carried into the next. Turns of a session are sequential, with the think time between;
    the load counts sessions (concurrency: sessions in flight; poisson: sessions started per second).
    num_requests counts turns: each repetition's are cut into sessions in order."""
    type: Literal["conversation"]
    turns: int | LengthDist = Field(3, description="turns per session: a number, or a length distribution "
                                                   "(dist, mean, std, min, max)")
    think_time_s: float | ThinkTime = Field(0.0, description="the user's pause before each later turn, in seconds: "
                                                             "a number, or {dist: uniform|exponential|fixed, ...}")

    @model_validator(mode="after")
    def _positive(self) -> ConversationPrompts:
        if isinstance(self.turns, int) and self.turns < 1:
            raise ValueError(f"turns: at least 1, got {self.turns}")
        if isinstance(self.think_time_s, float) and self.think_time_s < 0:
            raise ValueError(f"think_time_s: at least 0, got {self.think_time_s}")
        return self
