"""The oracle router: the upper bound DAMI's routers are measured against (ours).

It knows every query's answers at every lambda of a sweep and picks, per query, the cheapest
lambda that answers correctly (fewest tokens; ties go to the smaller lambda). A query no lambda
answers correctly gets its cheapest lambda: it is wrong whatever is chosen.
"""

from __future__ import annotations

from typing import Sequence

from dami_jax.dami.preferences import Rollout


def oracle_choice(answers: Sequence[Rollout]) -> Rollout:
    """The rollout the oracle serves for one query (``answers``: its rollouts across the grid)."""
    if not answers:
        raise ValueError("oracle_choice: the query has no rollouts")
    correct = [r for r in answers if r.correct]
    return min(correct or answers, key=lambda r: (r.tokens, r.lam))
