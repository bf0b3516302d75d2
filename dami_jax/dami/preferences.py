"""Preference pairs for DAMI-Pref, from rollouts of one query at several lambdas (ours).

The paper trains its router with "accuracy and efficiency criteria" without giving the rule; ours
(:func:`prefer`): at the same query, a correct answer beats a wrong one; between two correct
answers the one with fewer tokens wins, unless their token counts are within ``margin`` of each
other (a near-tie teaches nothing but noise); two wrong answers give no pair.

Accuracy comes first only within one query. A router generalizes across queries it cannot tell
apart, so where a cheap lambda is right on most of them and wrong on the rest, its "shorter"
pairs can outvote the "right" pairs of a costlier one: :func:`preference_pairs` therefore weighs
each token pair by ``token_weight`` (1: every pair alike; below 1: accuracy first across queries
too; measured on the SmolLM2 pair in docs/results.md).

Which queries train a router and which evaluate it is decided by a hash of the query id
(:func:`split_ids`), so the split is the same on every machine and for every sweep order.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One answer of a query at one lambda: was it right, and what did it cost."""

    lam: float
    correct: bool
    tokens: int  # generated tokens (the cost axis)


def prefer(a: Rollout, b: Rollout, margin: float = 0.1) -> int:
    """+1 if ``a`` beats ``b``, -1 if ``b`` beats ``a``, 0 for no pair (see the module docstring).

    ``margin``: fewer tokens only wins by more than ``margin`` times the longer answer's tokens.
    """
    if a.correct != b.correct:
        return 1 if a.correct else -1
    if not a.correct or abs(a.tokens - b.tokens) <= margin * max(a.tokens, b.tokens):
        return 0
    return 1 if a.tokens < b.tokens else -1


@dataclasses.dataclass(frozen=True)
class PreferencePairs:
    """Pairs as index arrays, so a training step gathers scores with no Python loop."""

    query: np.ndarray  # int32 [N]: row of the query in the feature matrix
    win: np.ndarray  # int32 [N]: grid index of the preferred lambda
    lose: np.ndarray  # int32 [N]: grid index of the other one
    weight: np.ndarray  # float32 [N]: the pair's weight in the loss (1 for a right-vs-wrong pair)

    def __len__(self) -> int:
        return len(self.query)

    def subset(self, queries: Sequence[int]) -> "PreferencePairs":
        """The pairs whose query is in ``queries``."""
        keep = np.isin(self.query, np.asarray(queries, np.int32))
        return PreferencePairs(self.query[keep], self.win[keep], self.lose[keep], self.weight[keep])


def grid_index(grid: Sequence[float], lam: float) -> int:
    """Position of ``lam`` on ``grid`` (to 1e-6); a lambda off the grid is an error."""
    matches = [i for i, g in enumerate(grid) if abs(g - lam) <= 1e-6]
    if not matches:
        raise ValueError(f"lambda {lam:g} is not on the grid {list(grid)}")
    return matches[0]


def preference_pairs(
    rollouts: Sequence[Sequence[Rollout]], grid: Sequence[float], margin: float = 0.1, token_weight: float = 1.0
) -> PreferencePairs:
    """All pairs of each query's rollouts that :func:`prefer` decides; ``rollouts[i]`` belongs to
    query row i, and every rollout's lambda must lie on ``grid``. A pair of two right answers
    (decided by tokens) weighs ``token_weight``, a right-vs-wrong pair 1."""
    if not 0.0 < token_weight <= 1.0:
        raise ValueError(f"token_weight must lie in (0, 1], got {token_weight}")
    query, win, lose, weight = [], [], [], []
    for row, answers in enumerate(rollouts):
        indexed = [(grid_index(grid, r.lam), r) for r in answers]
        for i, (gi, a) in enumerate(indexed):
            for gj, b in indexed[i + 1 :]:
                verdict = prefer(a, b, margin)
                if verdict:
                    query.append(row)
                    win.append(gi if verdict > 0 else gj)
                    lose.append(gj if verdict > 0 else gi)
                    weight.append(1.0 if a.correct != b.correct else token_weight)
    as_array = lambda xs: np.asarray(xs, np.int32)
    return PreferencePairs(as_array(query), as_array(win), as_array(lose), np.asarray(weight, np.float32))


def in_split(problem_id: str, fraction: float, salt: str) -> bool:
    """Whether ``problem_id`` falls in the first ``fraction`` of a hash-ordered split."""
    digest = hashlib.sha256(f"{salt}/{problem_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_ids(ids: Sequence[str], eval_fraction: float = 0.5, salt: str = "dami-router") -> tuple[list[str], list[str]]:
    """(train ids, eval ids), decided per id by its hash: the same id lands on the same side
    whichever other ids are present."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    evaluation = [i for i in ids if in_split(i, eval_fraction, salt)]
    chosen = set(evaluation)
    return [i for i in ids if i not in chosen], evaluation


def mean_tokens_per_lambda(rollouts: Mapping[str, Sequence[Rollout]], grid: Sequence[float]) -> np.ndarray:
    """float32 [G]: mean tokens at each grid lambda over the given queries (NaN where none ran)."""
    totals, counts = np.zeros(len(grid)), np.zeros(len(grid))
    for answers in rollouts.values():
        for r in answers:
            g = grid_index(grid, r.lam)
            totals[g] += r.tokens
            counts[g] += 1
    with np.errstate(invalid="ignore"):
        return (totals / counts).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class OutcomeTable:
    """Every query's outcome at every grid lambda, to score a routing choice directly."""

    correct: np.ndarray  # bool [Q, G]
    tokens: np.ndarray  # float32 [Q, G]

    def routed(self, choice: np.ndarray) -> tuple[float, float]:
        """(accuracy, mean tokens) of answering query q at grid index choice[q] (int [Q])."""
        rows = np.arange(len(choice))
        return float(self.correct[rows, choice].mean()), float(self.tokens[rows, choice].mean())


def outcome_table(rollouts: Sequence[Sequence[Rollout]], grid: Sequence[float]) -> OutcomeTable:
    """An :class:`OutcomeTable` of queries whose rollouts cover the whole grid."""
    correct = np.zeros((len(rollouts), len(grid)), bool)
    tokens = np.zeros((len(rollouts), len(grid)), np.float32)
    for q, answers in enumerate(rollouts):
        seen = set()
        for r in answers:
            g = grid_index(grid, r.lam)
            correct[q, g], tokens[q, g] = r.correct, r.tokens
            seen.add(g)
        if len(seen) != len(grid):
            raise ValueError(f"query {q}: rollouts cover {len(seen)} of the {len(grid)} grid lambdas")
    return OutcomeTable(correct, tokens)
