"""What a router that only tells difficulty levels apart could reach, with hindsight.

The oracle knows each problem's answers and so sends every problem it cannot get right to the
cheapest lambda; no router can know that. A router whose features tell only the difficulty level
apart serves every problem of a level at one lambda. Choosing that lambda per level with the
evaluation problems' own answers in hand bounds what such a router can do at a token budget: when
even this bound falls short of a goal, the goal is out of reach of level-wise routing, and the miss
is a property of the pair, not of the router's training.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterable, Sequence

MAX_CHOICES = 5_000_000  # grid size ** levels beyond which the exhaustive search is refused


@dataclasses.dataclass(frozen=True)
class LevelChoice:
    lambdas: dict[str, float]  # level (the problems' source) -> lambda
    correct: int
    tokens: int  # total generated tokens over all problems
    n: int


def best_per_level(records: Iterable[dict[str, Any]], grid: Sequence[float], max_tokens: float) -> LevelChoice | None:
    """The most accurate one-lambda-per-level choice (fewest tokens among equals) whose total
    tokens are at most ``max_tokens``; None when none fits. ``records``: sweep records (``lambda``,
    ``id``, ``source``, ``correct``, ``output_tokens``), each problem answered at every grid lambda."""
    grid = sorted(round(float(lam), 6) for lam in grid)
    cells: dict[tuple[str, float], list[int]] = {}
    ids: dict[float, set[str]] = {lam: set() for lam in grid}
    for r in records:
        lam = round(float(r["lambda"]), 6)
        if lam not in ids:
            continue
        ids[lam].add(r["id"])
        cell = cells.setdefault((r["source"], lam), [0, 0])
        cell[0] += bool(r["correct"])
        cell[1] += int(r["output_tokens"])
    problems = set.union(*ids.values()) if ids else set()
    if not problems or any(ids[lam] != problems for lam in grid):
        raise ValueError("best_per_level: every problem must be answered at every grid lambda")
    levels = sorted({source for source, _ in cells})
    if len(grid) ** len(levels) > MAX_CHOICES:
        raise ValueError(f"best_per_level: {len(grid)} lambdas ** {len(levels)} levels is too many choices to try")
    best = None
    for choice in itertools.product(grid, repeat=len(levels)):
        tokens = sum(cells[level, lam][1] for level, lam in zip(levels, choice))
        correct = sum(cells[level, lam][0] for level, lam in zip(levels, choice))
        if tokens <= max_tokens and (best is None or (correct, -tokens) > (best.correct, -best.tokens)):
            best = LevelChoice(dict(zip(levels, choice)), correct, tokens, len(problems))
    return best
