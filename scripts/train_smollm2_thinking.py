"""Fine-tune SmolLM2-135M-Instruct into a Thinking model: a low-rank update of its linear weights.

    .venv/bin/python scripts/train_smollm2_thinking.py            # the shipped update
    .venv/bin/python scripts/train_smollm2_thinking.py --steps 20 --run runs/try --out runs/try/update

The model learns to reason in a ``<think> ... </think>`` block (opened by the Thinking chat
template, ``dami_jax/models/smollm2-thinking/chat_template.jinja``) and then to answer with
``\\boxed{N}``, on problems whose worked solutions are generated and checked here:
- the toy task's chains (levels 2..6 from its train split, so no toy benchmark question: the
  split is by crc32, and every question is checked against the benchmark's by hash too);
- word problems in GSM8K's style (``dami_jax/toy/word_problems.py``), checked by hash against the
  offline GSM8K questions when their wheel is on disk.

The prompts are the evaluation's: the question plus the boxed-answer instruction
(:func:`dami_jax.evals.prompts.prompt_tokens`) through the Thinking template. The loss is
next-token cross-entropy on the completion only, of the base plus ``A @ B``
(:func:`dami_jax.models.low_rank.merge_low_rank` inside the jitted step, then ``dj``'s own
forward pass): the base is frozen, the optimizer (optax AdamW, warmup + cosine) holds only the
factors. Batches are a pure function of (seed, step), and ``--run`` holds orbax checkpoints of
the factors and the optimizer, so an interrupted run resumes where it stopped and ends with the
same parameters as an uninterrupted one. The run folder records its settings and refuses others.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from dami_jax.decoding.scoring import next_token_loss
from dami_jax.evals.benchmarks import load_gsm8k_offline
from dami_jax.evals.prompts import prompt_tokens
from dami_jax.evals.records import ResultsFolder, StaleResultsError
from dami_jax.files import write_atomic
from dami_jax.models.checkpoint import load_checkpoint
from dami_jax.models.config import ModelConfig
from dami_jax.models.low_rank import LINEAR_KERNELS, init_low_rank, apply_low_rank, merge_low_rank_exact, save_low_rank, update_bytes
from dami_jax.models.params import fingerprint
from dami_jax.models.pinned import SMOLLM2_THINKING_DIR, THINKING_TEMPLATE, smollm2_checkpoint
from dami_jax.models.tokenizer import load_tokenizer
from dami_jax.toy import task as toy
from dami_jax.toy.word_problems import question_hash, word_problem_stream

ROOT = Path(__file__).resolve().parents[1]
TOY_LEVELS = (2, 3, 4, 5, 6)
BUCKET = 32  # sequences are padded to a multiple of this, so that the step compiles a few times
HELD_OUT_TOY = 200  # toy benchmark problems per level checked by hash (the sweeps use fewer)


@dataclasses.dataclass(frozen=True)
class Settings:
    base: str  # the base checkpoint's content fingerprint
    rank: int
    steps: int
    batch: int
    lr: float
    warmup: int
    seed: int
    word_fraction: float  # the share of word problems; the rest are toy chains


def examples(seed: int, word_fraction: float):
    """Endless (question, worked lines, answer) triples, a pure function of ``seed``."""
    rng = np.random.default_rng([seed, 7])
    words = word_problem_stream(seed)
    chains = {lvl: toy.problem_stream(seed, "train", lvl) for lvl in TOY_LEVELS}
    while True:
        if rng.random() < word_fraction:
            p = next(words)
            yield p.question, "\n".join(p.steps) + "\n", p.answer
        else:
            p = next(chains[TOY_LEVELS[int(rng.integers(len(TOY_LEVELS)))]])
            yield p.question, toy.scratchpad(p), p.answer


def held_out_hashes() -> set[str]:
    """The questions no training example may be: the toy benchmark's and GSM8K's offline ones."""
    hashes = {question_hash(p.question) for p in toy.toy_benchmark(HELD_OUT_TOY, levels=TOY_LEVELS)}
    try:
        hashes |= {question_hash(p.question) for p in load_gsm8k_offline()}
    except Exception as e:  # the wheel is a dev carrier; the stories cannot be GSM8K's anyway
        print(f"note: GSM8K's offline questions are not on disk ({e}); checking the toy benchmark only", file=sys.stderr)
    return hashes


class Batches:
    """Batch ``step`` of a run: tokens and completion masks int32/float32 [batch, T], T a
    multiple of BUCKET; drawn from an example stream seeded by (seed, step), so any step's batch
    is known without replaying the ones before it."""

    def __init__(self, tokenizer, settings: Settings, held_out: set[str]):
        self.tok, self.s, self.held_out = tokenizer, settings, held_out
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end

    def encode(self, question: str, lines: str, answer: int) -> tuple[list[int], int]:
        if question_hash(question) in self.held_out:
            raise AssertionError(f"a held-out question was drawn for training: {question!r}")
        prompt = prompt_tokens(self.tok, question, "boxed")
        completion = self.tok.encode(toy.boxed_response(lines, answer), add_special_tokens=False)
        return prompt + completion + [self.end], len(prompt)

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray, int]:
        stream = examples(self.s.seed * 1_000_003 + step, self.s.word_fraction)
        rows = [self.encode(*next(stream)) for _ in range(self.s.batch)]
        length = -(-max(len(ids) for ids, _ in rows) // BUCKET) * BUCKET
        tokens = np.full((self.s.batch, length), self.pad, np.int32)
        mask = np.zeros((self.s.batch, length), np.float32)
        for i, (ids, start) in enumerate(rows):
            tokens[i, : len(ids)] = ids
            mask[i, start : len(ids)] = 1.0
        return tokens, mask, sum(len(ids) for ids, _ in rows)


def optimizer(s: Settings) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, s.lr, max(s.warmup, 1), max(s.steps, s.warmup + 1), end_value=0.1 * s.lr)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=0.0))


@partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3, 4))
def train_step(cfg: ModelConfig, opt, base, update, opt_state, tokens, mask):
    loss, grads = jax.value_and_grad(lambda u: next_token_loss(apply_low_rank(base, u), cfg, tokens, mask))(update)
    steps, opt_state = opt.update(grads, opt_state, update)
    return optax.apply_updates(update, steps), opt_state, loss


def train(base_folder: Path, run: Path, s: Settings, stop_after: int | None = None, held_out: set[str] | None = None):
    """Train (or resume) into ``run``; returns (update, stats). ``stop_after``: stop at that step
    as an interruption would (the run resumes from its last checkpoint)."""
    cfg, base = load_checkpoint(base_folder, dtype=jnp.float32)
    if fingerprint(base) != s.base:
        raise SystemExit(f"error: {base_folder} is not the checkpoint these settings name (fingerprint {s.base})")
    folder = ResultsFolder(run)
    try:
        folder.claim(dataclasses.asdict(s))
    except StaleResultsError as e:
        raise SystemExit(f"error: {e}") from None
    tokenizer = load_tokenizer(base_folder)
    tokenizer.chat_template = THINKING_TEMPLATE.read_text()
    batches = Batches(tokenizer, s, held_out_hashes() if held_out is None else held_out)
    opt = optimizer(s)
    update = init_low_rank(base, s.rank, jax.random.key(s.seed), LINEAR_KERNELS)
    state = {"update": update, "opt": opt.init(update)}
    options = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=max(1, min(50, s.steps // 10)))
    stats = json.loads(p.read_text()) if (p := run / "stats.json").is_file() else {"tokens": 0, "seconds": 0.0, "losses": []}
    with ocp.CheckpointManager((run / "checkpoints").absolute(), options=options) as manager:
        start = manager.latest_step() or 0
        if start:
            state = manager.restore(start, args=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state)))
            stats["losses"] = stats["losses"][:start]
        end = s.steps if stop_after is None else min(s.steps, stop_after)
        update, opt_state = state["update"], state["opt"]
        with tqdm(total=s.steps, initial=start, desc="training", unit="step", dynamic_ncols=True) as bar:
            for step in range(start, end):
                began = time.perf_counter()
                tokens, mask, real = batches(step)
                update, opt_state, loss = train_step(cfg, opt, base, update, opt_state, jnp.asarray(tokens), jnp.asarray(mask))
                loss = float(loss)
                if step > start:  # the first step of a (re)start compiles: not counted in the speed
                    stats["seconds"] += time.perf_counter() - began
                    stats["tokens"] += real
                stats["losses"].append(loss)
                bar.set_postfix(loss=f"{np.mean(stats['losses'][-20:]):.3f}", tok_s=f"{stats['tokens'] / max(stats['seconds'], 1e-9):.0f}")
                bar.update(1)
                if manager.should_save(step + 1) or step + 1 == end:
                    manager.save(step + 1, args=ocp.args.StandardSave({"update": update, "opt": opt_state}))
                    manager.wait_until_finished()
                    write_atomic(run / "stats.json", json.dumps(stats) + "\n")
    return update, stats, cfg, base


def arguments() -> argparse.ArgumentParser:
    """The command line; its defaults are the shipped update's settings (training.json)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=None, help="base HF folder (default: SmolLM2-135M-Instruct, converted)")
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "smollm2-thinking", help="checkpoints and stats (resumable)")
    ap.add_argument("--out", type=Path, default=SMOLLM2_THINKING_DIR, help="where the update file and its README go")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=320)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--word-fraction", type=float, default=0.5, help="share of word problems (the rest: toy chains)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop-after", type=int, default=None, help="stop at this step, as an interruption would")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = arguments()
    args = ap.parse_args(argv)
    if min(args.rank, args.steps, args.batch) < 1 or not 0 <= args.word_fraction <= 1 or args.lr <= 0:
        ap.error("--rank, --steps and --batch must be >= 1, --lr > 0 and --word-fraction in [0, 1]")
    base_folder = args.base or smollm2_checkpoint()
    began = time.perf_counter()
    base_fingerprint = fingerprint(load_checkpoint(base_folder, dtype=jnp.float32)[1])
    s = Settings(base_fingerprint, args.rank, args.steps, args.batch, args.lr, args.warmup, args.seed, args.word_fraction)
    update, stats, cfg, base = train(base_folder, args.run, s, args.stop_after)
    if len(stats["losses"]) < s.steps:
        print(f"stopped at step {len(stats['losses'])} of {s.steps}; rerun the same command to resume", file=sys.stderr)
        return
    thinking = fingerprint(merge_low_rank_exact(base, update))
    meta = {"base": s.base, "thinking": thinking, "settings": json.dumps(dataclasses.asdict(s), sort_keys=True)}
    path = save_low_rank(args.out / "low_rank.safetensors", update, meta)
    tok_s = stats["tokens"] / max(stats["seconds"], 1e-9)
    summary = {**dataclasses.asdict(s), "thinking": thinking, "bytes": path.stat().st_size, "update_bytes": update_bytes(update),
               "tokens": stats["tokens"], "train_seconds": stats["seconds"], "tokens_per_s": tok_s,
               "first_loss": stats["losses"][0], "final_loss": float(np.mean(stats["losses"][-20:])),
               "wall_seconds_this_run": time.perf_counter() - began, "cpus": os.cpu_count(), "jax": jax.__version__}  # fmt: skip
    write_atomic(args.out / "training.json", json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB); merged Thinking fingerprint {thinking}")


if __name__ == "__main__":
    main()
