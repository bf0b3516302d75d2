"""Accuracy-vs-cost summaries of a lambda sweep: per-lambda points, the Pareto frontier, its shape, a table.

The plot is :func:`dami_jax.evals.plots.plot_frontier`.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Iterable, Sequence

from dami_jax.evals.stats import format_interval


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    lam: float
    accuracy: float  # fraction correct
    mean_tokens: float  # mean generated tokens (the cost axis)
    think_rate: float  # fraction of responses that wrote a non-empty, closed think block
    cut_off: float  # fraction of answers the token budget cut off
    n: int


def sweep_points(records: Iterable[dict[str, Any]]) -> list[SweepPoint]:
    """One point per lambda, in lambda order."""
    by_lam: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_lam[round(float(r["lambda"]), 6)].append(r)
    points = []
    for lam in sorted(by_lam):
        rs = by_lam[lam]
        points.append(
            SweepPoint(
                lam=lam,
                accuracy=sum(r["correct"] for r in rs) / len(rs),
                mean_tokens=sum(r["output_tokens"] for r in rs) / len(rs),
                think_rate=sum(r["thought_chars"] > 0 for r in rs) / len(rs),
                cut_off=sum(r["truncated"] for r in rs) / len(rs),
                n=len(rs),
            )
        )
    return points


def pareto_frontier(points: Sequence[SweepPoint]) -> list[SweepPoint]:
    """Points no other point beats on both axes (higher accuracy and fewer tokens), by cost."""
    frontier = []
    for p in sorted(points, key=lambda p: (p.mean_tokens, -p.accuracy)):
        if not frontier or p.accuracy > frontier[-1].accuracy:
            frontier.append(p)
    return frontier


def frontier_shape(points: Sequence[SweepPoint], tolerance: float = 0.0) -> dict[str, bool]:
    """The pilot study's two claims, measured: accuracy is monotonic in lambda, and the Pareto
    frontier is convex (every frontier point lies on the upper convex hull of the frontier:
    diminishing accuracy returns per extra token)."""
    by_lam = sorted(points, key=lambda p: p.lam)
    accs = [p.accuracy for p in by_lam]
    monotonic = all(b >= a - tolerance for a, b in zip(accs, accs[1:]))
    frontier = pareto_frontier(points)
    convex = True
    for a, b, c in zip(frontier, frontier[1:], frontier[2:]):
        # b must lie on or above the chord a-c
        span = c.mean_tokens - a.mean_tokens
        chord = a.accuracy + (c.accuracy - a.accuracy) * (b.mean_tokens - a.mean_tokens) / span if span else a.accuracy
        convex &= b.accuracy >= chord - tolerance
    return {"monotonic_in_lambda": monotonic, "convex_frontier": convex}


def format_table(points: Sequence[SweepPoint]) -> str:
    """One row per lambda; the accuracy's 95% Wilson interval beside it."""
    lines = [f"{'lambda':>6}  {'accuracy':>8}  {'95% CI':>14}  {'mean tokens':>11}  {'cut off':>7}  {'think rate':>10}  {'n':>5}"]
    for p in points:
        lines.append(f"{p.lam:6.2f}  {p.accuracy:8.3f}  {format_interval(p.accuracy, p.n):>14}  {p.mean_tokens:11.1f}  "
                     f"{p.cut_off:7.2f}  {p.think_rate:10.2f}  {p.n:5d}")  # fmt: skip
    return "\n".join(lines)
