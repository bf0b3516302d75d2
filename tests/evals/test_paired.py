import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dami_jax.evals.paired import format_paired, mcnemar_exact, paired


def test_known_values():
    """By hand: 0 vs 6 discordant is 2/64; 1 vs 9 is 2 * 11/1024; an even split is 1."""
    assert mcnemar_exact(0, 6) == pytest.approx(0.03125)
    assert mcnemar_exact(9, 1) == pytest.approx(22 / 1024)
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) > 0.05 > mcnemar_exact(0, 6)  # 5 one-sided wins are not significant, 6 are


@given(st.integers(0, 300), st.integers(0, 300))
def test_symmetric_and_a_probability(b, c):
    p = mcnemar_exact(b, c)
    assert p == mcnemar_exact(c, b)
    assert 0.0 < p <= 1.0


@settings(deadline=None)  # the first example imports scipy
@given(st.integers(0, 200), st.integers(0, 200))
def test_matches_scipy_binomial_test(b, c):
    stats = pytest.importorskip("scipy.stats")
    if b + c:
        assert mcnemar_exact(b, c) == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_paired_counts_discordant_problems():
    method = {"a": True, "b": True, "c": False, "d": False, "e": True}
    thinking = {"a": True, "b": False, "c": True, "d": False, "e": False}
    result = paired("dami-pref", method, "thinking", thinking)
    assert (result.only_method, result.only_reference, result.n) == (2, 1, 5)
    assert result.p_value == mcnemar_exact(2, 1)


def test_paired_refuses_other_problems():
    with pytest.raises(ValueError, match="other problems"):
        paired("dami-pref", {"a": True}, "thinking", {"b": True})
    with pytest.raises(ValueError, match=">= 0"):
        mcnemar_exact(-1, 2)


def test_format_paired_has_a_row_per_method():
    tests = [paired("oracle", {"a": True, "b": True}, "thinking", {"a": True, "b": False}),
             paired("dami-pref", {"a": False, "b": False}, "thinking", {"a": True, "b": False})]  # fmt: skip
    lines = format_paired(tests).splitlines()
    assert len(lines) == 3 and "thinking" in lines[0]
    assert lines[1].split()[:3] == ["oracle", "1", "0"] and lines[2].split()[:3] == ["dami-pref", "0", "1"]
    assert format_paired([]) == ""
