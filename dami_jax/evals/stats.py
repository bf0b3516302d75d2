"""Confidence intervals for accuracies: with a few hundred problems a 2-point gap may be noise,
so every table that reports an accuracy reports its interval too."""

from __future__ import annotations

import math


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for the default ``z``): unlike the
    normal approximation it stays inside [0, 1] and is not empty at 0 or n successes."""
    if n <= 0:
        raise ValueError(f"wilson_interval: n must be positive, got {n}")
    if not 0 <= correct <= n:
        raise ValueError(f"wilson_interval: correct must lie in [0, {n}], got {correct}")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo = 0.0 if correct == 0 else max(0.0, centre - half)  # exact ends: rounding leaves ~1e-17 there
    hi = 1.0 if correct == n else min(1.0, centre + half)
    return lo, hi


def format_interval(accuracy: float, n: int) -> str:
    """``[lo, hi]`` of an accuracy measured on ``n`` problems, as a table cell."""
    lo, hi = wilson_interval(round(accuracy * n), n)
    return f"[{lo:.3f}, {hi:.3f}]"
