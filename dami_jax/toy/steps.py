"""Worked solutions as data: steps whose expressions refer to earlier steps' results, so that a
solution can be written out in several styles and worked with a deliberate slip whose effect runs
on through the later steps (what a System 2 trace's check has to catch).

A step ``Step("c", "=", "{1}*2", formula="b*2")`` reads "c is b times 2", where ``{1}`` is the
result of step 1 (b). Worked on ``(46, ...)`` it gives the expression ``46*2`` and the value 92,
written ``c=46*2=92``, or with its formula ``c=b*2=46*2=92``. A word problem's step
``Step("Pencils in the boxes", ": ", "5*12")`` is written ``Pencils in the boxes: 5*12=60``.
"""

from __future__ import annotations

import ast
import dataclasses
import operator
from fractions import Fraction
from typing import Sequence

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


@dataclasses.dataclass(frozen=True)
class Step:
    name: str  # what the step computes: "c", "Pencils in the boxes"
    sep: str  # between the name and the computation: "=" (toy chains) or ": " (word problems)
    expression: str  # integers, + - * / and {i}, the result of step i: "{1}*2", "5*12"
    formula: str = ""  # the step in the question's own terms, where it has them: "b*2"

    def head(self, formula: bool = False) -> str:
        """How a line names the step: ``c``, or with its formula ``c=b*2``."""
        return f"{self.name}{self.sep}{self.formula}" if formula and self.formula else self.name

    def line(self, expression: str, value: int, formula: bool = False) -> str:
        """The worked line: ``c=46*2=92`` (``c=b*2=46*2=92`` with the formula)."""
        return f"{self.head(formula)}{self.sep}{expression}={value}"


def evaluate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression of integers and + - * / (no names, no calls)."""

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"not an arithmetic expression of integers: {expression!r}")

    return value(ast.parse(expression, mode="eval").body)


@dataclasses.dataclass(frozen=True)
class Work:
    """Steps worked out: each one's expression with the values it used, and the value written."""

    expressions: tuple[str, ...]
    values: tuple[int, ...]


def work(steps: Sequence[Step], slip: tuple[int, int] | None = None) -> Work | None:
    """Work ``steps`` in order; ``slip = (i, v)`` writes ``v`` as step i's result, and the later
    steps use it. None when a step's value is not a whole number >= 0 (a slip can make a later
    division inexact, or divide by zero), so a slip that a real solver could not have carried on from is never made."""
    expressions: list[str] = []
    values: list[int] = []
    for i, step in enumerate(steps):
        expression = step.expression.format(*values)
        try:
            exact = evaluate(expression)
        except ZeroDivisionError:
            return None
        if exact.denominator != 1 or exact < 0:
            return None
        expressions.append(expression)
        values.append(slip[1] if slip is not None and slip[0] == i else int(exact))
    return Work(tuple(expressions), tuple(values))
