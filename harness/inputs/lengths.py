"""Token lengths drawn per request from a workload's `{dist: ...}` (harness/config/prompts.py LengthDist)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np

from harness.config.prompts import LengthDist

T = TypeVar("T")


def draw_lengths(value: int | LengthDist, n: int, rng: np.random.Generator) -> list[int]:
    """n lengths: the number itself, or draws from the distribution rounded and clipped to [min, max]."""
    if not isinstance(value, LengthDist):
        return [int(value)] * n
    d = value
    if d.dist == "fixed":
        return [int(d.mean)] * n
    if d.dist == "uniform":
        return rng.integers(d.min, d.max, size=n, endpoint=True).tolist()
    if d.dist == "normal":
        x = rng.normal(d.mean, d.std, size=n)
    else:  # lognormal, parametrized by the mean and std of the lengths themselves, not of their logarithm
        sigma2 = np.log1p((d.std / d.mean) ** 2)
        x = rng.lognormal(np.log(d.mean) - sigma2 / 2, np.sqrt(sigma2), size=n)
    return np.clip(np.rint(x), d.min, d.max).astype(int).tolist()


def same_each_repetition(draw: Callable[[int], list[T]], segments: list[range]) -> list[T]:
    """One value per request of the segments (the warm-up, then each repetition), with one `draw(n)` per segment
    length: every repetition sends the same drawn lengths in the same order, so the spread between repetitions
    measures the machine, not the draw (the texts still differ: a prefix cache must not make later repetitions look
    faster). A warm-up of another length has a draw of its own."""
    draws: dict[int, list[T]] = {}
    out: list[T] = []
    for seg in segments:
        if len(seg) not in draws:
            draws[len(seg)] = draw(len(seg))
        out += draws[len(seg)]
    return out
