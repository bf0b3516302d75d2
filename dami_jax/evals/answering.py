"""Answer a batch of benchmark problems with one model and grade each answer: one record each."""

from __future__ import annotations

import hashlib
import time
from typing import Any, Iterator, Sequence

import jax

from dami_jax.decoding.generation import generate
from dami_jax.decoding.sampling import GREEDY, Sampling
from dami_jax.engine.engine import Engine
from dami_jax.evals.benchmarks import Problem
from dami_jax.evals.grading import extract_answer, grade
from dami_jax.evals.prompts import Style, prompt_tokens, think_status, thought
from dami_jax.models.config import ModelConfig
from dami_jax.models.params import Params


def problem_hash(problem: Problem) -> str:
    """Identifies a problem's content (question and gold answer), so that a record is never
    matched to a changed problem that kept its id."""
    return hashlib.sha256(f"{problem.question}\0{problem.answer}".encode()).hexdigest()[:16]


def answer(
    params: Params,
    cfg: ModelConfig,
    tokenizer,
    problems: Sequence[Problem],
    *,
    style: Style,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    keys: jax.Array | None = None,
) -> list[dict[str, Any]]:
    """Generate one batch through ``tokenizer``'s chat template and grade it; one record per problem.

    ``keys``: one PRNG key per problem when sampling (each answer then depends only on its key).
    Grading (ours): a response cut off inside an open think block has no answer; one that stopped
    by itself without closing the block (Instruct-like behaviour under the Thinking template) is
    graded as a whole.
    """
    prompts = [prompt_tokens(tokenizer, p, style) for p in problems]
    out = generate(params, cfg, prompts, max_new_tokens=max_new_tokens, sampling=sampling, key=keys)
    return grade_rows(cfg, tokenizer, problems, prompts, out.token_lists())


def answer_on_engine(
    engine: Engine,
    tokenizer,
    problems: Sequence[Problem],
    prompts: Sequence[Sequence[int]],
    lambdas: Sequence[float],
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    keys: jax.Array | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """Queue every problem (its rendered prompt, at its lambda) on ``engine`` and yield graded
    records as they finish, batch by batch. ``tokenizer`` decodes the answers. Each record's
    ``wall_s`` is its share of the wall time since the previous batch finished, so that they add
    up to the whole run's."""
    queued = {}
    for i, (problem, prompt, lam) in enumerate(zip(problems, prompts, lambdas)):
        request = engine.submit(prompt, lam=lam, max_new_tokens=max_new_tokens, sampling=sampling,
                                key=None if keys is None else keys[i])  # fmt: skip
        queued[request] = (problem, prompt)
    last = time.perf_counter()
    for results in engine.result_batches():
        now = time.perf_counter()
        share, last = (now - last) / len(results), now
        done = [queued.pop(r.id) for r in results]
        records = grade_rows(engine.cfg, tokenizer, [d[0] for d in done], [d[1] for d in done], [r.tokens for r in results])
        yield [{**record, "wall_s": share} for record in records]


def grade_rows(cfg: ModelConfig, tokenizer, problems: Sequence[Problem], prompts: Sequence[Sequence[int]],
               rows: Sequence[Sequence[int]]) -> list[dict[str, Any]]:  # fmt: skip
    """One graded record per generated row (token ids after ``prompts``, which answer ``problems``).
    Rows may come from different models or templates: each row's prompt says whether its template
    opened the think block."""
    records = []
    for problem, prompt, row in zip(problems, prompts, rows):
        row, n = list(row), len(row)
        stopped = n > 0 and row[-1] in cfg.eos_token_ids
        response = tokenizer.decode(row, skip_special_tokens=True)
        opened, closed = think_status(tokenizer.decode(prompt[-8:]), response)
        cut_in_thought = opened and not closed and not stopped
        records.append({
            "id": problem.id,
            "source": problem.source,
            "question": problem.question,
            "problem_hash": problem_hash(problem),
            "gold": problem.answer,
            "response": response,
            "extracted": extract_answer(response, think_opened=cut_in_thought),
            "correct": bool(grade(response, problem.answer, think_opened=cut_in_thought)),
            "output_tokens": int(n),
            "think_opened": bool(opened),
            "think_closed": bool(closed),
            "thought_chars": len(thought(response)) if closed else 0,
            "truncated": not stopped,
        })  # fmt: skip
    return records
