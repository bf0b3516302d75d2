"""The toy task family behind the embedded Instruct/Thinking pair (``dami_jax/toy/toy-pair``).

A problem is a chain of integer operations with a difficulty ``steps`` in 1..6::

    a=37, b=a+9, c=b*2, d=c-8. d=?            (3 steps; answer 84)

Operands are single digits (``+``/``-`` 1..9, ``*`` 2..9) and every value stays in 0..99 (operands
are drawn so that no step leaves that range; no modular wrap-around), so numbers have at most
two digits. One step is easy to do in one shot; six chained steps are not, for a tiny model,
unless it writes the intermediate results down. The two response formats:

- Instruct (System 1) answers directly: ``Answer: 84``.
- Thinking (System 2): the chat template opens the think block (``<think>\\n``, the Qwen3-2507
  Thinking convention), the model writes one line per step, closes the block, then answers::

      b=37+9=46
      c=46*2=92
      d=92-8=84
      </think>
      Answer: 84

The final line is always ``Answer: <integer>``, which :func:`dami_jax.evals.grading.extract_answer`
reads like any other benchmark answer.

Problems of 2..6 steps are split into train and held-out test by a hash of the question text,
so no such benchmark question (:func:`toy_benchmark`) is ever a training question; the two also
draw from different seed streams. One-step questions are the 1,888 single operations, the
arithmetic facts that every scratchpad line also uses; they belong to both splits.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Iterable, Sequence

import numpy as np

from dami_jax.evals.grading import ANSWER_LINE
from dami_jax.models.tokenizer import THINK_CLOSE, THINK_OPEN
from dami_jax.toy.tokenizer import IM_END

MAX_STEPS = 6
MAX_VALUE = 99
ADD_MAX = 9  # operand range of + and -: 1..ADD_MAX
MUL_MAX = 9  # operand range of *: 2..MUL_MAX
VARIABLES = "abcdefg"  # a holds the start value; steps assign b, c, ...
LEVEL1_QUESTIONS = 1888  # distinct 1-step questions (shared by the train and test splits)
TEST_FRACTION = 10  # from 2 steps on, 1 in TEST_FRACTION questions (by crc32) is held out



@dataclasses.dataclass(frozen=True)
class ToyProblem:
    """One chain problem. ``values[i]`` is the value of ``VARIABLES[i]``; ``values[-1]`` the answer."""

    id: str
    question: str
    answer: int
    source: str  # f"toy-{steps}"
    steps: int
    values: tuple[int, ...]  # start value, then each step's result (the intermediate results)
    ops: tuple[tuple[str, int], ...]  # (operator, operand) per step

    @property
    def intermediates(self) -> tuple[int, ...]:
        """The result of each step (the last one is the answer)."""
        return self.values[1:]


def _step(rng: np.random.Generator, x: int) -> tuple[str, int, int]:
    """A random operation on x whose result stays in 0..MAX_VALUE: (op, operand, result)."""
    choices = []
    if x < MAX_VALUE:
        choices.append("+")
    if x > 0:
        choices.append("-")
    if 1 <= x <= MAX_VALUE // 2:
        choices.append("*")
    op = choices[int(rng.integers(len(choices)))]
    if op == "+":
        k = int(rng.integers(1, min(ADD_MAX, MAX_VALUE - x) + 1))
        return op, k, x + k
    if op == "-":
        k = int(rng.integers(1, min(ADD_MAX, x) + 1))
        return op, k, x - k
    k = int(rng.integers(2, min(MUL_MAX, MAX_VALUE // x) + 1))
    return op, k, x * k


def make_problem(rng: np.random.Generator, steps: int, id: str = "") -> ToyProblem:
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be in 1..{MAX_STEPS}, got {steps}")
    x = int(rng.integers(0, MAX_VALUE + 1))
    values, ops, parts = [x], [], [f"a={x}"]
    for i in range(steps):
        op, k, x = _step(rng, x)
        values.append(x)
        ops.append((op, k))
        parts.append(f"{VARIABLES[i + 1]}={VARIABLES[i]}{op}{k}")
    question = ", ".join(parts) + f". {VARIABLES[steps]}=?"
    return ToyProblem(id, question, x, f"toy-{steps}", steps, tuple(values), tuple(ops))


def split_of(question: str) -> str:
    """'test' for the held-out questions (1 in TEST_FRACTION, by crc32), else 'train'.
    (:func:`problem_stream` applies it from 2 steps on; 1-step questions are in both splits.)"""
    return "test" if zlib.crc32(question.encode()) % TEST_FRACTION == 0 else "train"


_STREAMS = {"train": 0, "test": 1}


def problem_stream(seed: int, split: str = "train", steps: int | Sequence[int] | None = None) -> Iterable[ToyProblem]:
    """An endless, deterministic stream of ``split`` problems. ``steps``: a level, a list of
    levels to draw uniformly from, or None for all of 1..MAX_STEPS."""
    if split not in _STREAMS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    levels = list(range(1, MAX_STEPS + 1)) if steps is None else [steps] if isinstance(steps, int) else list(steps)
    rng = np.random.default_rng([seed, _STREAMS[split]])
    i = 0
    while True:
        level = levels[int(rng.integers(len(levels)))] if len(levels) > 1 else levels[0]
        p = make_problem(rng, level)
        if level == 1 or split_of(p.question) == split:
            yield dataclasses.replace(p, id=f"toy-{split}-{seed}-{i}")
            i += 1


def generate_problems(n: int, seed: int, steps: int | Sequence[int] | None = None, split: str = "train") -> list[ToyProblem]:
    """``n`` problems from :func:`problem_stream` (same seed, same problems)."""
    stream = problem_stream(seed, split, steps)
    return [next(stream) for _ in range(n)]


def toy_benchmark(n_per_level: int, seed: int = 0, levels: Sequence[int] = range(1, MAX_STEPS + 1)) -> list[ToyProblem]:
    """Held-out evaluation set: ``n_per_level`` distinct test-split problems per level, ids
    ``toy-{steps}-{i}``, source ``toy-{steps}``; level by level in order. Level 1 has only
    ``LEVEL1_QUESTIONS`` distinct questions."""
    out = []
    for level in levels:
        seen: set[str] = set()
        stream = problem_stream(seed, "test", level)
        for _ in range(100 * n_per_level + 10_000):
            if len(seen) == n_per_level:
                break
            p = next(stream)
            if p.question not in seen:
                out.append(dataclasses.replace(p, id=f"toy-{level}-{len(seen)}"))
                seen.add(p.question)
        else:
            raise ValueError(f"level {level} has too few distinct questions for n_per_level={n_per_level} (level 1 has {LEVEL1_QUESTIONS})")
    return out


# ---- response formats ------------------------------------------------------------------------


def scratchpad(p: ToyProblem) -> str:
    """One line per step: ``c=49*2=98\\n``."""
    return "".join(
        f"{VARIABLES[i + 1]}={p.values[i]}{op}{k}={p.values[i + 1]}\n" for i, (op, k) in enumerate(p.ops)
    )


def answer_line(answer: int) -> str:
    return f"Answer: {answer}"


def boxed_response(worked: str, answer: int) -> str:
    """How a chat model's Thinking answers a boxed-style prompt (the question plus "put your final
    answer within \\boxed{}"), after its template's ``<think>\\n``: the worked lines (each ending
    with a newline), the closed block, then the boxed answer. Our SmolLM2 Thinking is trained on it."""
    return f"{worked}{THINK_CLOSE}\n{boxed_answer(answer)}"


def boxed_answer(answer: int) -> str:
    return f"The answer is \\boxed{{{answer}}}."


def instruct_response(p: ToyProblem) -> str:
    """What the Instruct model writes after its generation prompt (before ``<|im_end|>``)."""
    return answer_line(p.answer)


def thinking_response(p: ToyProblem) -> str:
    """What the Thinking model writes after its generation prompt, which already ends with
    ``<think>\\n`` (before ``<|im_end|>``)."""
    return f"{scratchpad(p)}{THINK_CLOSE}\n{answer_line(p.answer)}"


def completion(p: ToyProblem, think: bool, opened: bool) -> str:
    """The assistant text after a generation prompt, ``<|im_end|>`` included.

    ``opened``: the prompt already ends with ``<think>\\n`` (thinking template). The four
    combinations are what the training script teaches:
    direct + plain -> ``Answer: N``; direct + opened -> ``</think>\\nAnswer: N`` (an empty think
    block, so the Instruct model stays System 1 under the thinking template); think + opened ->
    :func:`thinking_response`; think + plain -> ``<think>\\n`` + :func:`thinking_response`.
    """
    if think:
        body = thinking_response(p) if opened else f"{THINK_OPEN}\n{thinking_response(p)}"
    else:
        body = f"{THINK_CLOSE}\n{answer_line(p.answer)}" if opened else answer_line(p.answer)
    return body + IM_END


def well_formed(text: str, opened: bool = False) -> bool:
    """True if ``text`` (a completion decoded with special tokens skipped) has exactly one answer
    line, last, and at most one think block, closed before it. ``opened``: the prompt already
    opened the think block (thinking template), so the completion must close it."""
    lines = text.rstrip("\n").split("\n")
    if not ANSWER_LINE.fullmatch(lines[-1]) or text.count("Answer: ") != 1:
        return False
    opens = text.count(THINK_OPEN) + int(opened)
    return opens <= 1 and text.count(THINK_CLOSE) == opens and not (opened and text.count(THINK_OPEN))
