"""Paired comparison of two methods on the same problems (McNemar's exact test).

Two methods answering the same problems are not two independent samples: their accuracies'
intervals may overlap while one method is right on every problem the other gets right and more.
What decides whether they differ is the discordant problems alone: those right under one method
and wrong under the other. Under "no difference" each discordant problem is as likely to fall
either way, so their split is Binomial(b + c, 1/2), and the exact two-sided p-value is twice its
smaller tail (capped at 1).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class Paired:
    """``method`` against ``reference`` on ``n`` shared problems."""

    method: str
    reference: str
    only_method: int  # problems right under the method and wrong under the reference
    only_reference: int  # problems right under the reference and wrong under the method
    n: int
    p_value: float  # McNemar's exact two-sided test


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value from the two discordant counts (1.0 when there are none)."""
    if min(only_a, only_b) < 0:
        raise ValueError(f"mcnemar_exact: discordant counts must be >= 0, got {only_a} and {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def paired(method: str, correct: Mapping[str, bool], reference: str, reference_correct: Mapping[str, bool]) -> Paired:
    """Compare ``correct`` (problem id -> right?) with ``reference_correct`` on the same problems;
    the two must cover the same ids, since a paired test on different problems means nothing."""
    if set(correct) != set(reference_correct):
        missing = sorted(set(correct) ^ set(reference_correct))
        raise ValueError(f"paired: {method} and {reference} answered other problems ({len(missing)} differ, e.g. {missing[0]})")
    only_method = sum(1 for i, ok in correct.items() if ok and not reference_correct[i])
    only_reference = sum(1 for i, ok in correct.items() if not ok and reference_correct[i])
    return Paired(method, reference, only_method, only_reference, len(correct), mcnemar_exact(only_method, only_reference))


def format_paired(tests: Sequence[Paired]) -> str:
    """One row per method: the problems only it gets right, those only the reference gets right,
    and McNemar's exact p-value (a table to print beside the accuracies)."""
    if not tests:
        return ""
    reference = tests[0].reference
    lines = [f"{'paired vs ' + reference:<22} {'right only here':>15} {'right only ' + reference:>{11 + len(reference)}} {'McNemar p':>9} {'n':>5}"]
    for t in tests:
        lines.append(f"{t.method:<22} {t.only_method:15d} {t.only_reference:{11 + len(reference)}d} {t.p_value:9.3g} {t.n:5d}")
    return "\n".join(lines)
