import pytest

from dami_jax.evals.level_bound import best_per_level


def _records(table):
    """table: (source, id, lambda, correct, tokens) rows."""
    return [{"source": s, "id": i, "lambda": lam, "correct": c, "output_tokens": t} for s, i, lam, c, t in table]


# Level a: lambda 0 is right and cheap on one of two problems, lambda 1 on both at 50 tokens each.
# Level b: lambda 0 never right (10 tokens each), lambda 1 right on one (100 tokens each).
RECORDS = _records([
    ("a", "a1", 0.0, True, 10), ("a", "a2", 0.0, False, 10), ("a", "a1", 1.0, True, 50), ("a", "a2", 1.0, True, 50),
    ("b", "b1", 0.0, False, 10), ("b", "b2", 0.0, False, 10), ("b", "b1", 1.0, True, 100), ("b", "b2", 1.0, False, 100),
])  # fmt: skip


def test_unlimited_budget_takes_the_most_accurate_lambda_per_level():
    best = best_per_level(RECORDS, (0.0, 1.0), max_tokens=1e9)
    assert best.lambdas == {"a": 1.0, "b": 1.0} and (best.correct, best.tokens, best.n) == (3, 300, 4)


def test_a_budget_forces_the_cheapest_loss():
    """At 220 tokens level b goes to lambda 0 (loses 1, saves 180); level a keeps lambda 1."""
    best = best_per_level(RECORDS, (0.0, 1.0), max_tokens=220)
    assert best.lambdas == {"a": 1.0, "b": 0.0} and (best.correct, best.tokens) == (2, 120)
    assert best_per_level(RECORDS, (0.0, 1.0), max_tokens=119).correct == 1  # both levels at lambda 0
    assert best_per_level(RECORDS, (0.0, 1.0), max_tokens=39) is None


def test_ties_go_to_fewer_tokens():
    cheaper = _records([("b", "b1", 0.5, True, 40), ("b", "b2", 0.5, False, 40)])
    both = [*RECORDS, *cheaper, *_records([("a", "a1", 0.5, True, 50), ("a", "a2", 0.5, True, 50)])]
    best = best_per_level(both, (0.0, 0.5, 1.0), max_tokens=1e9)
    assert best.lambdas["b"] == 0.5 and best.tokens == 180


def test_every_problem_must_be_answered_at_every_lambda():
    with pytest.raises(ValueError, match="every grid lambda"):
        best_per_level(RECORDS[:-1], (0.0, 1.0), max_tokens=1e9)
