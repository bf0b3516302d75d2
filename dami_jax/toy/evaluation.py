"""The toy task as a benchmark: held-out problems, greedy evaluation per level, and the
teacher-forcing sequences the path diagnostics run on."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from dami_jax.evals.answering import answer
from dami_jax.evals.benchmarks import Problem
from dami_jax.evals.prompts import Style, prompt_tokens, template_opens_think
from dami_jax.toy.task import MAX_STEPS, ToyProblem, boxed_answer, boxed_response, completion, scratchpad, toy_benchmark, well_formed
from dami_jax.toy.tokenizer import IM_END
from dami_jax.toy.traces import TRACES, render, toy_steps


def as_problem(p: ToyProblem) -> Problem:
    return Problem(p.id, p.question, str(p.answer), p.source)


def toy_problems(n_per_level: int = 10, seed: int = 0) -> list[Problem]:
    """The embedded toy pair's held-out benchmark (:func:`toy_benchmark`), as :class:`Problem` rows."""
    return [as_problem(p) for p in toy_benchmark(n_per_level, seed)]


@dataclasses.dataclass(frozen=True)
class ToyResult:
    problem: ToyProblem
    text: str  # decoded completion, special tokens skipped (think tokens kept)
    correct: bool
    num_tokens: int  # generated tokens, the stop token included
    stopped: bool  # ended on an EOS token within the budget
    opened: bool  # the prompt (chat template) opened the think block

    @property
    def well_formed(self) -> bool:
        """Stopped on EOS, with a :func:`dami_jax.toy.task.well_formed` completion."""
        return self.stopped and well_formed(self.text, self.opened)


def evaluate(params, cfg, tokenizer, problems: Sequence[ToyProblem], *, max_new_tokens: int = 96, batch_size: int | None = None) -> list[ToyResult]:
    """Greedy-decode each problem's chat prompt (the tokenizer's own template) and grade it as the
    sweeps do (:func:`dami_jax.evals.answering.answer`)."""
    problems = list(problems)
    opened = template_opens_think(tokenizer)
    batch_size = batch_size or max(len(problems), 1)
    results = []
    for lo in range(0, len(problems), batch_size):
        batch = problems[lo : lo + batch_size]
        records = answer(params, cfg, tokenizer, [as_problem(p) for p in batch], style="toy", max_new_tokens=max_new_tokens)
        for p, r in zip(batch, records):
            results.append(ToyResult(p, r["response"], r["correct"], r["output_tokens"], not r["truncated"], opened))
    return results


def summarize_levels(results: Sequence[ToyResult]) -> dict[int, dict[str, float]]:
    """Per level: accuracy, mean generated tokens, share well formed, count."""
    table: dict[int, dict[str, float]] = {}
    for level in sorted({r.problem.steps for r in results}):
        rs = [r for r in results if r.problem.steps == level]
        table[level] = {
            "accuracy": float(np.mean([r.correct for r in rs])),
            "tokens": float(np.mean([r.num_tokens for r in rs])),
            "well_formed": float(np.mean([r.well_formed for r in rs])),
            "n": len(rs),
        }
    return table


def diagnostic_sequences(
    tokenizer,
    n_per_level: int,
    seed: int = 0,
    levels: Sequence[int] = range(1, MAX_STEPS + 1),
    style: Style = "toy",
    trace: str = "worked",
) -> tuple[list[list[int]], list[list[bool]]]:
    """Teacher-forcing sequences for path diagnostics (loss along lam, representation continuity).

    Each :func:`toy_benchmark` problem's chat prompt in ``style``, rendered by ``tokenizer``'s
    template, followed by the reference completion for that template: the worked response if the
    template opens the think block (thinking template), else the direct answer; ``<|im_end|>``
    included. ``toy`` style is the toy pair's format (``Answer: N``); ``boxed`` is a chat model's
    (:func:`dami_jax.toy.task.boxed_response`, what our SmolLM2 Thinking learned). ``trace``
    (boxed style, thinking template): which :mod:`dami_jax.toy.traces` answer is the reference;
    ``checked`` is what System 2 of the ``smollm2-systems`` pair learned (with no slip), so its
    loss along the path is measured on its own format.
    Returns (token ids per sequence, mask per sequence: True where the token is a completion
    token, i.e. a target of the next-token loss).
    """
    if trace not in TRACES:
        raise ValueError(f"unknown trace {trace!r}; known: {', '.join(TRACES)}")
    if style == "toy" and trace != "worked":
        raise ValueError(f"the toy style has one reference format; trace {trace!r} needs the boxed style")
    opened = template_opens_think(tokenizer)
    sequences, masks = [], []
    for p in toy_benchmark(n_per_level, seed=seed, levels=levels):
        prompt = prompt_tokens(tokenizer, p.question, style)
        if style == "toy":
            reply = completion(p, think=opened, opened=opened)
        else:
            reply = (render(trace, toy_steps(p)).text if opened else boxed_answer(p.answer)) + IM_END
        reply_ids = tokenizer.encode(reply, add_special_tokens=False)
        sequences.append(prompt + reply_ids)
        masks.append([False] * len(prompt) + [True] * len(reply_ids))
    return sequences, masks
