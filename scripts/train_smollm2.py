"""Fine-tune SmolLM2-135M-Instruct into the models of its pinned pairs: low-rank updates of its
linear weights, one per way of answering.

    .venv/bin/python scripts/train_smollm2.py              # the smollm2-systems pair: system1, then system2
    .venv/bin/python scripts/train_smollm2.py thinking     # the smollm2 pair's Thinking (issue 17)
    .venv/bin/python scripts/train_smollm2.py system2 --steps 20 --runs runs/try --out runs/try   # a trial

Each update learns one trace style (``dami_jax/toy/traces.py``): ``system1`` answers at once
(``The answer is \\boxed{N}.``, under Instruct's chat template), ``system2`` works the steps,
checks each one and corrects a deliberate slip where a trace has one (under the Thinking template,
which opens ``<think>``), ``thinking`` writes the worked lines only. The problems:
- the toy task's chains (levels 2..6 from its train split, so no toy benchmark question: the
  split is by crc32, and every question is checked against the benchmark's by hash too);
- word problems in GSM8K's style (``dami_jax/toy/word_problems.py``), checked by hash against the
  offline GSM8K questions when their wheel is on disk.

The prompts are the evaluation's: the question plus the boxed-answer instruction
(:func:`dami_jax.evals.prompts.prompt_tokens`) through the update's chat template. The loss is
next-token cross-entropy on the completion only (a slip's wrong value excepted), of the base with
``A @ B`` beside each linear kernel (:func:`dami_jax.models.low_rank.apply_low_rank`, then ``dj``'s
own forward pass, which computes ``x @ W + (x @ A) @ B``): the base is frozen, the optimizer (optax
AdamW, warmup + cosine) holds only the factors. Batches are a pure function of (seed, step), and each update's run folder holds orbax
checkpoints of the factors and the optimizer, so an interrupted run resumes where it stopped and
ends with the same parameters as an uninterrupted one. A run folder records its settings and
refuses others.
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
from dami_jax.models.low_rank import LINEAR_KERNELS, apply_low_rank, init_low_rank, merge_low_rank_exact, save_low_rank, update_bytes
from dami_jax.models.params import fingerprint
from dami_jax.models.pinned import SYSTEM1, SYSTEM2, THINKING, PinnedUpdate, smollm2_checkpoint
from dami_jax.models.tokenizer import load_tokenizer
from dami_jax.toy import task as toy
from dami_jax.toy.traces import draw_slip, render, toy_steps
from dami_jax.toy.word_problems import question_hash, word_problem_stream

ROOT = Path(__file__).resolve().parents[1]
TOY_LEVELS = (2, 3, 4, 5, 6)
BUCKET = 32  # sequences are padded to a multiple of this, so that the step compiles a few times
HELD_OUT_TOY = 200  # toy benchmark problems per level checked by hash (the sweeps use fewer)
SETTINGS_ARGS = ("rank", "steps", "batch", "lr", "warmup", "seed", "word_fraction", "slip_rate")


@dataclasses.dataclass(frozen=True)
class Settings:
    base: str  # the base checkpoint's content fingerprint
    style: str  # the trace style (dami_jax.toy.traces.TRACES)
    rank: int
    steps: int
    batch: int
    lr: float
    warmup: int
    seed: int
    word_fraction: float  # the share of word problems; the rest are toy chains
    slip_rate: float  # the share of traces with a deliberate slip (checked traces only)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """An update: its trace style, where it ships (and its template), and its default settings,
    which are the shipped update's (a test checks them against its training.json)."""

    style: str
    pinned: PinnedUpdate
    defaults: dict[str, float]


RECIPES = {
    "thinking": Recipe("worked", THINKING, dict(rank=8, steps=320, batch=8, lr=1e-3, warmup=20, seed=0, word_fraction=0.5, slip_rate=0.0)),
    "system1": Recipe("direct", SYSTEM1, dict(rank=8, steps=40, batch=12, lr=1e-3, warmup=4, seed=0, word_fraction=0.5, slip_rate=0.0)),
    "system2": Recipe("checked", SYSTEM2, dict(rank=8, steps=160, batch=4, lr=1e-3, warmup=10, seed=0, word_fraction=0.5, slip_rate=0.3)),
}
PAIR = ("system1", "system2")  # what a run without names trains: the smollm2-systems pair


def examples(seed: int, word_fraction: float):
    """Endless (question, steps) pairs, a pure function of ``seed``."""
    rng = np.random.default_rng([seed, 7])
    words = word_problem_stream(seed)
    chains = {lvl: toy.problem_stream(seed, "train", lvl) for lvl in TOY_LEVELS}
    while True:
        if rng.random() < word_fraction:
            p = next(words)
            yield p.question, p.steps
        else:
            p = next(chains[TOY_LEVELS[int(rng.integers(len(TOY_LEVELS)))]])
            yield p.question, toy_steps(p)


def held_out_hashes() -> set[str]:
    """The questions no training example may be: the toy benchmark's and GSM8K's offline ones."""
    hashes = {question_hash(p.question) for p in toy.toy_benchmark(HELD_OUT_TOY, levels=TOY_LEVELS)}
    try:
        hashes |= {question_hash(p.question) for p in load_gsm8k_offline()}
    except Exception as e:  # the wheel is a dev carrier; the stories cannot be GSM8K's anyway
        print(f"note: GSM8K's offline questions are not on disk ({e}); checking the toy benchmark only", file=sys.stderr)
    return hashes


class Batches:
    """Batch ``step`` of a run: tokens and loss masks int32/float32 [batch, T], T a multiple of
    BUCKET; drawn from example and slip streams seeded by (seed, step), so any step's batch is
    known without replaying the ones before it."""

    def __init__(self, tokenizer, settings: Settings, held_out: set[str]):
        self.tok, self.s, self.held_out = tokenizer, settings, held_out
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end

    def encode(self, question: str, steps, slip=None) -> tuple[list[int], list[float]]:
        """The prompt and the trace, and which tokens the loss counts: the trace's, except those
        that touch one of its untrained spans, and the closing ``<|im_end|>``."""
        if question_hash(question) in self.held_out:
            raise AssertionError(f"a held-out question was drawn for training: {question!r}")
        prompt = prompt_tokens(self.tok, question, "boxed")
        trace = render(self.s.style, steps, slip)
        encoded = self.tok(trace.text, add_special_tokens=False, return_offsets_mapping=True)
        counted = [float(not any(a < end and start < b for a, b in trace.untrained)) for start, end in encoded["offset_mapping"]]
        return prompt + encoded["input_ids"] + [self.end], [0.0] * len(prompt) + counted + [1.0]

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray, int]:
        seed = self.s.seed * 1_000_003 + step
        stream, slips = examples(seed, self.s.word_fraction), np.random.default_rng([seed, 11])
        rows = []
        for question, steps in (next(stream) for _ in range(self.s.batch)):
            slip = draw_slip(steps, slips) if slips.random() < self.s.slip_rate else None
            rows.append(self.encode(question, steps, slip))
        length = -(-max(len(ids) for ids, _ in rows) // BUCKET) * BUCKET
        tokens = np.full((self.s.batch, length), self.pad, np.int32)
        mask = np.zeros((self.s.batch, length), np.float32)
        for i, (ids, counted) in enumerate(rows):
            tokens[i, : len(ids)] = ids
            mask[i, : len(ids)] = counted
        return tokens, mask, sum(len(ids) for ids, _ in rows)


def optimizer(s: Settings) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, s.lr, max(s.warmup, 1), max(s.steps, s.warmup + 1), end_value=0.1 * s.lr)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=0.0))


@partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3, 4))
def train_step(cfg: ModelConfig, opt, base, update, opt_state, tokens, mask):
    loss, grads = jax.value_and_grad(lambda u: next_token_loss(apply_low_rank(base, u), cfg, tokens, mask))(update)
    steps, opt_state = opt.update(grads, opt_state, update)
    return optax.apply_updates(update, steps), opt_state, loss


def train(base_folder: Path, run: Path, s: Settings, template: Path | None, stop_after: int | None = None,
          held_out: set[str] | None = None, name: str = "training"):  # fmt: skip
    """Train (or resume) into ``run``, prompts through ``template`` (None: the base's); returns
    (update, stats, cfg, base). ``stop_after``: stop at that step as an interruption would (the
    run resumes from its last checkpoint)."""
    cfg, base = load_checkpoint(base_folder, dtype=jnp.float32)
    if fingerprint(base) != s.base:
        raise SystemExit(f"error: {base_folder} is not the checkpoint these settings name (fingerprint {s.base})")
    folder = ResultsFolder(run)
    try:
        folder.claim(dataclasses.asdict(s))
    except StaleResultsError as e:
        raise SystemExit(f"error: {e}") from None
    tokenizer = load_tokenizer(base_folder)
    if template is not None:
        tokenizer.chat_template = template.read_text()
    batches = Batches(tokenizer, s, held_out_hashes() if held_out is None else held_out)
    opt = optimizer(s)
    update = init_low_rank(base, s.rank, jax.random.key(s.seed), LINEAR_KERNELS)
    state = {"update": update, "opt": opt.init(update)}
    options = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=max(1, min(20, s.steps // 10)))
    fresh = {"tokens": 0, "seconds": 0.0, "losses": [], "step_seconds": [], "trained_tokens": []}
    stats = json.loads(p.read_text()) if (p := run / "stats.json").is_file() else fresh
    with ocp.CheckpointManager((run / "checkpoints").absolute(), options=options) as manager:
        start = manager.latest_step() or 0
        if start:
            state = manager.restore(start, args=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state)))
        stats.update({k: stats[k][:start] for k in ("losses", "step_seconds", "trained_tokens")})
        end = s.steps if stop_after is None else min(s.steps, stop_after)
        update, opt_state = state["update"], state["opt"]
        with tqdm(total=s.steps, initial=start, desc=name, unit="step", dynamic_ncols=True) as bar:
            for step in range(start, end):
                began = time.perf_counter()
                tokens, mask, real = batches(step)
                update, opt_state, loss = train_step(cfg, opt, base, update, opt_state, jnp.asarray(tokens), jnp.asarray(mask))
                loss = float(loss)
                seconds = time.perf_counter() - began
                if step > start:  # the first step of a (re)start compiles: not counted in the speed
                    stats["seconds"] += seconds
                    stats["tokens"] += real
                stats["losses"].append(loss)
                stats["step_seconds"].append(seconds)
                stats["trained_tokens"].append(int(mask.sum()))
                bar.set_postfix(loss=f"{np.mean(stats['losses'][-20:]):.3f}", tok_s=f"{stats['tokens'] / max(stats['seconds'], 1e-9):.0f}")
                bar.update(1)
                if manager.should_save(step + 1) or step + 1 == end:
                    manager.save(step + 1, args=ocp.args.StandardSave({"update": update, "opt": opt_state}))
                    manager.wait_until_finished()
                    write_atomic(run / "stats.json", json.dumps(stats) + "\n")
    return update, stats, cfg, base


def export(out: Path, s: Settings, update, stats: dict, base) -> dict:
    """Write the update file (its metadata: the base's and the merged model's fingerprints, and
    the settings) and training.json into ``out``; returns the summary."""
    merged = fingerprint(merge_low_rank_exact(base, update))
    meta = {"base": s.base, "merged": merged, "settings": json.dumps(dataclasses.asdict(s), sort_keys=True)}
    path = save_low_rank(out / "low_rank.safetensors", update, meta)
    summary = {**dataclasses.asdict(s), "merged": merged, "bytes": path.stat().st_size, "update_bytes": update_bytes(update),
               "steps_done": len(stats["losses"]), "tokens": stats["tokens"], "train_seconds": stats["seconds"],
               "tokens_per_s": stats["tokens"] / max(stats["seconds"], 1e-9), "wall_seconds": sum(stats["step_seconds"]),
               "mean_trained_tokens_per_sequence": sum(stats["trained_tokens"]) / (len(stats["losses"]) * s.batch),
               "first_loss": stats["losses"][0], "final_loss": float(np.mean(stats["losses"][-20:])),
               "cpus": os.cpu_count(), "jax": jax.__version__}  # fmt: skip
    write_atomic(out / "training.json", json.dumps(summary, indent=1) + "\n")
    return summary


def arguments() -> argparse.ArgumentParser:
    """The command line; an update's settings default to its recipe's (the shipped update's)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("updates", nargs="*", metavar="UPDATE",
                    help=f"which updates to train, in order: {', '.join(RECIPES)} (default: {' '.join(PAIR)})")  # fmt: skip
    ap.add_argument("--base", type=Path, default=None, help="base HF folder (default: SmolLM2-135M-Instruct, converted)")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "smollm2", help="checkpoints and stats, a folder per update (resumable)")
    ap.add_argument("--out", type=Path, default=None, help="write each update into OUT/<name> (default: where it ships)")
    for name in SETTINGS_ARGS:
        kind = int if name in ("rank", "steps", "batch", "warmup", "seed") else float
        ap.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help="default: the update's recipe")
    ap.add_argument("--stop-after", type=int, default=None, help="stop at this step, as an interruption would")
    ap.add_argument("--export-unfinished", action="store_true", help="write an update from a run that stopped early")
    return ap


def settings_for(recipe: Recipe, args: argparse.Namespace, base: str) -> Settings:
    chosen = {k: recipe.defaults[k] if getattr(args, k) is None else getattr(args, k) for k in SETTINGS_ARGS}
    return Settings(base=base, style=recipe.style, **chosen)


def main(argv: list[str] | None = None) -> None:
    ap = arguments()
    args = ap.parse_args(argv)
    if unknown := [name for name in args.updates if name not in RECIPES]:
        ap.error(f"unknown update {unknown[0]!r}; known: {', '.join(RECIPES)}")
    base_folder = args.base or smollm2_checkpoint()
    base_fingerprint = fingerprint(load_checkpoint(base_folder, dtype=jnp.float32)[1])
    for name in args.updates or PAIR:
        recipe = RECIPES[name]
        s = settings_for(recipe, args, base_fingerprint)
        if min(s.rank, s.steps, s.batch) < 1 or not 0 <= s.word_fraction <= 1 or s.lr <= 0 or not 0 <= s.slip_rate <= 1:
            ap.error("--rank, --steps and --batch must be >= 1, --lr > 0, --word-fraction and --slip-rate in [0, 1]")
        if s.slip_rate and s.style != "checked":
            ap.error(f"--slip-rate: {name}'s traces carry no slips")
        update, stats, cfg, base = train(base_folder, args.runs / name, s, recipe.pinned.template, args.stop_after, name=name)
        if len(stats["losses"]) < s.steps and not args.export_unfinished:
            print(f"{name}: stopped at step {len(stats['losses'])} of {s.steps}; rerun the same command to resume", file=sys.stderr)
            return
        out = recipe.pinned.folder if args.out is None else args.out / name
        summary = export(out, s, update, stats, base)
        print(json.dumps(summary, indent=1))
        print(f"wrote {out / 'low_rank.safetensors'} ({summary['bytes'] / 1e6:.2f} MB); merged fingerprint {summary['merged']}")


if __name__ == "__main__":
    main()
