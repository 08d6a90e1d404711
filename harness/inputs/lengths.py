"""Token lengths drawn per request from a workload's `{dist: ...}` (harness/config/prompts.py LengthDist)."""

from __future__ import annotations

import numpy as np

from harness.config.prompts import LengthDist


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
