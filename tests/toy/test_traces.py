"""Worked solutions as steps, and the three trace styles written from them: a worked trace is the
toy scratchpad the Thinking update was trained on, a checked trace recomputes every step and
corrects a slip (and everything it led to), a slip's wrong value is the one untrained span, and
slips are only drawn where the later steps can go on from them."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dami_jax.toy import task as toy
from dami_jax.toy.steps import Step, evaluate, work
from dami_jax.toy.traces import CHECK_OPENING, draw_slip, render, toy_steps
from dami_jax.toy.word_problems import word_problem, word_problem_stream

CHECK = re.compile(r"^Check (.+): ([\d+\-*/]+)=(\d+)(?:\. Correct\.|, not (\d+)\. Corrected\.)$")


def test_evaluate_is_exact_arithmetic_and_nothing_else():
    assert evaluate("100*20/100") == 20 and evaluate("7/2") * 2 == 7 and evaluate("45-4") == 41
    for bad in ("__import__('os')", "2**8", "a+1", "1.5*2"):
        with pytest.raises(ValueError, match="not an arithmetic expression"):
            evaluate(bad)


def test_a_slip_runs_on_through_the_later_steps():
    steps = (Step("b", "=", "37+9", "a+9"), Step("c", "=", "{0}*2", "b*2"), Step("d", "=", "{1}-8", "c-8"))
    assert work(steps).values == (46, 92, 84)
    slipped = work(steps, (1, 82))
    assert slipped.values == (46, 82, 74) and slipped.expressions == ("37+9", "46*2", "82-8")
    share = (Step("Cookies shared", ": ", "40-3"), Step("Each friend", ": ", "{0}/4"))
    assert work(share, (0, 38)) is None and work(share, (0, 0)).values == (0, 0)  # 38/4 is no whole number
    assert work((Step("a", ": ", "3-3"), Step("b", ": ", "8/{0}"))) is None  # a division by zero


def test_a_worked_trace_is_the_thinking_updates_scratchpad_and_a_direct_one_its_last_line():
    for p in toy.generate_problems(50, seed=3, steps=[2, 3, 4, 5, 6]):
        assert render("worked", toy_steps(p)).text == toy.boxed_response(toy.scratchpad(p), p.answer)
        last = toy.scratchpad(p).splitlines()[-1]  # the last step, worked from the value before it
        assert render("direct", toy_steps(p)).text == f"{last}\n{toy.boxed_answer(p.answer)}"


@pytest.mark.parametrize("source", ["toy", "words"])
def test_a_checked_trace_recomputes_every_step_and_corrects_a_slip(source):
    rng = np.random.default_rng(0)
    words, chains = word_problem_stream(1), toy.problem_stream(1, "train", [2, 3, 4, 5, 6])
    slipped = 0
    for _ in range(200):
        steps = next(words).steps if source == "words" else toy_steps(next(chains))
        slip = draw_slip(steps, rng)
        right, written = work(steps), work(steps, slip)
        trace = render("checked", steps, slip)
        worked, checks = trace.text.split(CHECK_OPENING)
        checks = checks.split("</think>\n")[0].splitlines()
        assert len(checks) == len(steps) and trace.text.endswith(toy.boxed_answer(right.values[-1]))
        for line, step, value, was in zip(checks, steps, right.values, written.values):
            name, expression, recomputed, wrong = CHECK.match(line).groups()
            assert name == step.head(formula=True) and evaluate(expression) == int(recomputed) == value
            assert wrong == (None if value == was else str(was))
        if slip is not None:
            slipped += 1
            assert worked.splitlines()[slip[0]].endswith(f"={slip[1]}")
            ((start, end),) = trace.untrained
            assert trace.text[start:end] == str(slip[1]) and trace.text[end] == "\n"
            assert slip[1] != right.values[slip[0]] and slip[1] - right.values[slip[0]] in (-10, -2, -1, 1, 2, 10)
        else:
            assert trace.untrained == ()
    assert slipped > 150  # almost every problem has a slip the later steps can go on from


def test_only_a_checked_trace_carries_a_slip_and_styles_are_named():
    steps = word_problem(np.random.default_rng(0), "farm").steps
    with pytest.raises(ValueError, match="only a checked trace carries a slip"):
        render("worked", steps, (0, 3))
    with pytest.raises(ValueError, match="unknown trace style 'nope'; known: direct, worked, checked"):
        render("nope", steps)
