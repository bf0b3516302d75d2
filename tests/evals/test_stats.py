import pytest
from hypothesis import given
from hypothesis import strategies as st

from dami_jax.evals.stats import format_interval, wilson_interval


def test_known_values():
    """Textbook values: 0 of 10 is [0, 0.278]; 89 of 120 (74.2%) is [0.657, 0.812]."""
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(89, 120) == pytest.approx((0.6567, 0.8116), abs=1e-4)
    assert format_interval(89 / 120, 120) == "[0.657, 0.812]"


@given(st.integers(1, 2000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_interval_holds_the_estimate_inside_unit_range(case):
    correct, n = case
    lo, hi = wilson_interval(correct, n)
    assert 0.0 <= lo <= correct / n <= hi <= 1.0
    assert hi - lo > 0


@given(st.integers(1, 200), st.integers(2, 10))
def test_more_problems_narrow_the_interval(n, factor):
    """The same accuracy on factor x the problems has a narrower interval."""
    lo, hi = wilson_interval(n // 2, n)
    lo2, hi2 = wilson_interval(factor * (n // 2), factor * n)
    assert hi2 - lo2 < hi - lo


@pytest.mark.parametrize("correct, n", [(1, 0), (-1, 5), (6, 5)])
def test_bad_counts_are_rejected(correct, n):
    with pytest.raises(ValueError, match="wilson_interval"):
        wilson_interval(correct, n)
