"""Templated word problems: every worked line computes, the last line is the answer, the stream is
deterministic, and no question is one of GSM8K's (by hash)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dami_jax.evals.benchmarks import load_gsm8k_offline
from dami_jax.toy.word_problems import TEMPLATES, question_hash, word_problem, word_problem_stream

LINE = re.compile(r"^[^:]+: (\d+)([+\-*/])(\d+)(?:([+\-*/])(\d+))?=(\d+)$")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def evaluate(line: str) -> tuple[float, int]:
    m = LINE.match(line)
    assert m, line
    a, op, b, op2, c, value = m.groups()
    result = OPS[op](int(a), int(b))
    if op2:
        result = OPS[op2](result, int(c))
    return result, int(value)


def test_every_line_of_every_template_computes():
    stream = word_problem_stream(0)
    seen = set()
    for _ in range(3000):
        p = next(stream)
        seen.add(p.template)
        previous = None
        for line in p.lines:
            result, value = evaluate(line)
            assert result == value and value >= 0, (p.question, line)
            previous = value
        assert previous == p.answer
    assert seen == set(TEMPLATES)


def test_the_stream_is_a_function_of_its_seed():
    a, b, c = word_problem_stream(3), word_problem_stream(3), word_problem_stream(4)
    first = [next(a) for _ in range(20)]
    assert first == [next(b) for _ in range(20)]
    assert first != [next(c) for _ in range(20)]
    assert len({p.question for p in first}) == 20


def test_templates_are_named():
    p = word_problem(np.random.default_rng(0), "farm")
    assert p.template == "farm" and "legs" in p.question
    with pytest.raises(ValueError, match="unknown word-problem template 'nope'; known: boxes, change"):
        word_problem(np.random.default_rng(0), "nope")


def test_no_question_is_a_gsm8k_question():
    gsm = {question_hash(p.question) for p in load_gsm8k_offline()}  # the wheel is a dev carrier: make test has it
    assert len(gsm) == 100
    stream = word_problem_stream(0)
    assert not any(question_hash(next(stream).question) in gsm for _ in range(5000))
    assert question_hash("  Tom has\n3 apples ") == question_hash("tom has 3 apples")
