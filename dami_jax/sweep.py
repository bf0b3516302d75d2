"""Lambda sweeps: answer a benchmark on theta(lambda) for a grid of lambdas, grade, record.

Records go to a JSONL log as each batch finishes; rerunning with the same log skips finished
(lambda, problem) pairs, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from dami_jax.benchmarks import Problem
from dami_jax.generation import generate
from dami_jax.grading import extract_answer, grade
from dami_jax.interpolation import interpolate
from dami_jax.pair import ModelPair
from dami_jax.prompts import prompt_tokens, think_status, thought
from dami_jax.records import JsonlLog
from dami_jax.sampling import GREEDY, Sampling

DEFAULT_LAMBDAS = tuple(round(0.1 * i, 1) for i in range(11))
TEMPLATES = ("thinking", "instruct", "nearest")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    max_new_tokens: int = 256
    batch_size: int = 16
    # Whose chat template renders the prompt at every lambda (ours): "thinking" (default; it opens
    # the think block, so closing it measures when explicit thinking switches on), "instruct", or
    # "nearest" (the template of the closer endpoint).
    template: str = "thinking"
    sampling: Sampling = GREEDY
    seed: int = 0
    style: str = "boxed"  # prompt style (dami_jax.prompts.math_prompt): "boxed", or "toy" for the toy pair

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {self.template!r}")
        if not self.lambdas:
            raise ValueError("lambdas: need at least one value")

    def template_for(self, lam: float) -> str:
        if self.template == "nearest":
            return "instruct" if lam < 0.5 else "thinking"
        return self.template


def _key(record: dict[str, Any]) -> tuple[float, str]:
    return round(float(record["lambda"]), 6), str(record["id"])


def answer_batch(
    pair: ModelPair, theta: Any, problems: Sequence[Problem], lam: float, config: SweepConfig, key: jax.Array
) -> list[dict[str, Any]]:
    """Generate and grade one batch on ``theta`` (= theta(lam)); one record per problem."""
    template = config.template_for(lam)
    tokenizer = pair.tokenizers[template]
    prompts = [prompt_tokens(tokenizer, p, config.style) for p in problems]
    out = generate(theta, pair.cfg, prompts, max_new_tokens=config.max_new_tokens, sampling=config.sampling, key=key)
    lengths = np.asarray(out.lengths)
    records = []
    for problem, prompt, row, n in zip(problems, prompts, out.token_lists(), lengths):
        stopped = n > 0 and row[-1] in pair.cfg.eos_token_ids
        response = tokenizer.decode(row, skip_special_tokens=True)
        opened, closed = think_status(tokenizer.decode(prompt[-8:]), response)
        # Ours: a response cut off inside an open think block has no answer; one that stopped by
        # itself without closing the block (Instruct-like behaviour under the Thinking template)
        # is graded as a whole.
        cut_in_thought = opened and not closed and not stopped
        records.append(
            {
                "lambda": lam,
                "id": problem.id,
                "source": problem.source,
                "template": template,
                "gold": problem.answer,
                "response": response,
                "extracted": extract_answer(response, think_opened=cut_in_thought),
                "correct": bool(grade(response, problem.answer, think_opened=cut_in_thought)),
                "output_tokens": int(n),
                "think_opened": bool(opened),
                "think_closed": bool(closed),
                "thought_chars": len(thought(response)) if closed else 0,
                "truncated": not stopped,
            }
        )
    return records


def run_sweep(
    pair: ModelPair, problems: Sequence[Problem], log_path: str | Path, config: SweepConfig = SweepConfig()
) -> list[dict[str, Any]]:
    """Sweep ``config.lambdas`` over ``problems``; returns all records of this grid (old and new)."""
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError("problems: ids must be unique (they key the resumable log)")
    log = JsonlLog(log_path)
    done = log.done(_key)
    todo = {lam: [p for p in problems if (round(lam, 6), str(p.id)) not in done] for lam in config.lambdas}
    total = len(config.lambdas) * len(problems)
    theta = None
    with tqdm(total=total, initial=total - sum(map(len, todo.values())), desc="sweep", unit="answer") as bar:
        for index, lam in enumerate(config.lambdas):
            if not todo[lam]:
                continue
            # Reuse the previous theta's buffers: a lambda switch allocates no third model.
            theta = interpolate(pair.instruct, pair.thinking, lam, out=theta)
            bar.set_postfix(lam=lam)
            for start in range(0, len(todo[lam]), config.batch_size):
                batch = todo[lam][start : start + config.batch_size]
                key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), index), start)
                log.extend(answer_batch(pair, theta, batch, lam, config, key))
                bar.update(len(batch))
    wanted = {(round(lam, 6), str(i)) for lam in config.lambdas for i in ids}
    return [r for r in log.records if _key(r) in wanted]
