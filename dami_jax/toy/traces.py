"""The answers SmolLM2's updates are trained to write, one style per update (the completion after
the chat template's generation prompt; ``<|im_end|>`` follows):

- ``direct`` (System 1): one short line, the last step worked from the value before it, then the
  answer (``d=83+1=84`` and ``The answer is \\boxed{84}.``): on a one-step problem the whole
  solution, on a longer one a leap to the last step with no working before it.
- ``worked`` (the ``smollm2`` pair's Thinking; its template opens ``<think>``): one line per step,
  ``</think>``, then the boxed answer (:func:`dami_jax.toy.task.boxed_response`).
- ``checked`` (System 2; its template opens ``<think>``): the steps with their formulas, then a
  check that recomputes each step from the checked values before it and corrects a wrong one, then
  the answer. Some traces carry a deliberate slip (:func:`draw_slip`): one step's result written
  wrong, the later steps worked on from it, and the check finding and fixing each::

      b=a+9=37+9=46
      c=b*2=46*2=82
      d=c-8=82-8=74
      Let me check each step.
      Check b=a+9: 37+9=46. Correct.
      Check c=b*2: 46*2=92, not 82. Corrected.
      Check d=c-8: 92-8=84, not 74. Corrected.
      </think>
      The answer is \\boxed{84}.

  The slipped value itself is marked untrained (:attr:`Trace.untrained`): the model learns to
  catch a slip, never to make one.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from dami_jax.models.tokenizer import THINK_CLOSE
from dami_jax.toy.steps import Step, work
from dami_jax.toy.task import VARIABLES, ToyProblem, boxed_answer, boxed_response

TRACES = ("direct", "worked", "checked")
CHECK_OPENING = "Let me check each step.\n"
SLIPS = (-10, -2, -1, 1, 2, 10)  # how far a deliberate slip is off


@dataclasses.dataclass(frozen=True)
class Trace:
    text: str
    untrained: tuple[tuple[int, int], ...] = ()  # [start, end) character spans the loss skips


def toy_steps(p: ToyProblem) -> tuple[Step, ...]:
    """A toy chain's steps: ``c=b*2`` is ``Step("c", "=", "{1}*2", "b*2")``; the first step's
    operand is the question's start value."""
    return tuple(
        Step(VARIABLES[i + 1], "=", f"{p.values[0] if i == 0 else '{' + str(i - 1) + '}'}{op}{k}", f"{VARIABLES[i]}{op}{k}")
        for i, (op, k) in enumerate(p.ops)
    )


def draw_slip(steps: Sequence[Step], rng: np.random.Generator, tries: int = 8) -> tuple[int, int] | None:
    """A slip ``(step, wrong value)`` that the later steps can be worked on from (whole values
    >= 0), or None when ``tries`` draws found none."""
    right = work(steps).values
    for _ in range(tries):
        i = int(rng.integers(len(steps)))
        wrong = right[i] + int(rng.choice(SLIPS))
        if wrong >= 0 and work(steps, (i, wrong)) is not None:
            return i, wrong
    return None


def render(style: str, steps: Sequence[Step], slip: tuple[int, int] | None = None) -> Trace:
    """The ``style`` answer (one of :data:`TRACES`) to the problem that ``steps`` solve; ``slip``
    (``checked`` only) writes one step wrong first."""
    if style not in TRACES:
        raise ValueError(f"unknown trace style {style!r}; known: {', '.join(TRACES)}")
    if slip is not None and style != "checked":
        raise ValueError(f"only a checked trace carries a slip, not a {style} one")
    right = work(steps)
    if style == "direct":
        return Trace(f"{steps[-1].line(right.expressions[-1], right.values[-1])}\n{boxed_answer(right.values[-1])}")
    if style == "worked":
        lines = "".join(f"{s.line(e, v)}\n" for s, e, v in zip(steps, right.expressions, right.values))
        return Trace(boxed_response(lines, right.values[-1]))
    return _checked(steps, right, right if slip is None else work(steps, slip), slip)


def _checked(steps, right, written, slip) -> Trace:
    text, untrained = "", []
    for i, (step, expression, value) in enumerate(zip(steps, written.expressions, written.values)):
        text += step.line(expression, value, formula=True)
        if slip is not None and i == slip[0]:
            untrained.append((len(text) - len(str(value)), len(text)))
        text += "\n"
    text += CHECK_OPENING
    for step, expression, value, was in zip(steps, right.expressions, right.values, written.values):
        verdict = ". Correct." if value == was else f", not {was}. Corrected."
        text += f"Check {step.head(formula=True)}: {expression}={value}{verdict}\n"
    return Trace(f"{text}{THINK_CLOSE}\n{boxed_answer(right.values[-1])}", tuple(untrained))
