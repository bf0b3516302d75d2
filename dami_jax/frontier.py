"""Accuracy-vs-cost summaries of a lambda sweep: per-lambda table, Pareto frontier, its shape, a plot."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    lam: float
    accuracy: float  # fraction correct
    mean_tokens: float  # mean generated tokens (the cost axis)
    think_rate: float  # fraction of responses that wrote a non-empty, closed think block
    n: int


def summarize(records: Iterable[dict[str, Any]]) -> list[SweepPoint]:
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
    lines = [f"{'lambda':>6}  {'accuracy':>8}  {'mean tokens':>11}  {'think rate':>10}  {'n':>5}"]
    for p in points:
        lines.append(f"{p.lam:6.2f}  {p.accuracy:8.3f}  {p.mean_tokens:11.1f}  {p.think_rate:10.2f}  {p.n:5d}")
    return "\n".join(lines)


def plot_frontier(points: Sequence[SweepPoint], path: str | Path, title: str = "DAMI lambda sweep") -> Path:
    """Accuracy vs mean generated tokens, one labelled dot per lambda, frontier as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    xs, ys = [p.mean_tokens for p in points], [100 * p.accuracy for p in points]
    scatter = ax.scatter(xs, ys, c=[p.lam for p in points], cmap="viridis", zorder=3)
    frontier = pareto_frontier(points)
    for p in _labelled(points, frontier):
        ax.annotate(f"{p.lam:g}", (p.mean_tokens, 100 * p.accuracy), textcoords="offset points", xytext=(6, -3), fontsize=8)
    ax.plot([p.mean_tokens for p in frontier], [100 * p.accuracy for p in frontier], "--", color="gray", zorder=2, label="Pareto frontier")
    fig.colorbar(scatter, ax=ax, label="lambda (0 = Instruct, 1 = Thinking)")
    ax.set_xlabel("mean generated tokens")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _labelled(points: Sequence[SweepPoint], frontier: Sequence[SweepPoint], spacing: float = 0.05) -> list[SweepPoint]:
    """Points that get a lambda label: frontier points first, then the rest, skipping any within
    ``spacing`` (fraction of each axis' range) of a label already placed: the colour bar tells
    the lambda of crowded dots without labels printed over each other."""
    x_range = (max(p.mean_tokens for p in points) - min(p.mean_tokens for p in points)) or 1.0
    y_range = (max(p.accuracy for p in points) - min(p.accuracy for p in points)) or 1.0
    placed: list[SweepPoint] = []
    for p in [*frontier, *(q for q in points if q not in frontier)]:
        if all(abs(p.mean_tokens - q.mean_tokens) / x_range > spacing or abs(p.accuracy - q.accuracy) / y_range > spacing for q in placed):
            placed.append(p)
    return placed
