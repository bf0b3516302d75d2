"""Train the embedded toy Instruct/Thinking pair (``dami_jax/toy/toy-pair``).

    .venv/bin/python scripts/train_toy_pair.py            # full run (13 min on 2 idle CPU cores)
    .venv/bin/python scripts/train_toy_pair.py --quick    # a few minutes, writes runs/toy_pair_quick

Three phases, all next-token cross-entropy on the assistant tokens only, float32, optax AdamW with
warmup + cosine decay, a jitted step over ``dami_jax.decoding.scoring.next_token_loss``:

1. **base** from random init on a mixture of the task in both styles after both templates
   (mostly scratchpads after the thinking template's ``<think>\\n`` and direct answers after the
   plain template), levels 1..6;
2. **instruct**, a short fine-tune of the base on direct answers (``Answer: N``; and, after the
   thinking template's ``<think>\\n``, an empty think block ``</think>\\nAnswer: N``);
3. **thinking**, a short fine-tune of the *same* base on scratchpads (and, after the plain
   template, ``<think>\\n`` + scratchpad), so that the two stay linearly connected.

Both are written as HF Qwen3 folders (config.json + model.safetensors + tokenizer files with a
chat template), then reloaded from disk and evaluated greedily on the held-out toy benchmark
(instruct, thinking, their lam=0.5 midpoint, and a small lam grid). The tables and timings go to stdout and to
``README.md`` beside the models. Everything is seeded; XLA CPU results can still differ across
machines in the last bits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from dami_jax.dami.interpolation import interpolate
from dami_jax.decoding.scoring import next_token_loss
from dami_jax.models.checkpoint import load_checkpoint, save_hf_checkpoint
from dami_jax.models.config import ModelConfig, RopeConfig
from dami_jax.models.params import init_params
from dami_jax.models.tokenizer import load_tokenizer
from dami_jax.toy import task as toy
from dami_jax.toy.evaluation import evaluate, summarize_levels
from dami_jax.toy.pair import PAIR_DIR
from dami_jax.toy.tokenizer import IM_END, build_tokenizer, prompt_text

ROOT = Path(__file__).resolve().parents[1]

LEVELS = np.arange(1, toy.MAX_STEPS + 1)
DIRECT_LEVELS = np.array([4, 2, 1, 1, 1, 1], float)  # one-shot answers to long chains are mostly noise
THINK_LEVELS = np.ones(6)
LAMBDA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclasses.dataclass(frozen=True)
class Part:
    """One kind of training example: completion style (think?) after which template (opened?)."""

    weight: float
    think: bool
    opened: bool
    levels: np.ndarray


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    steps: int
    peak_lr: float
    warmup: int
    weight_decay: float
    mixture: tuple[Part, ...]
    data_seed: int


def phases(args) -> list[Phase]:
    # Part(weight, think, opened, level weights)
    base_mix = (
        Part(0.5, True, True, THINK_LEVELS),
        Part(0.1, True, False, THINK_LEVELS),
        Part(0.3, False, False, DIRECT_LEVELS),
        Part(0.1, False, True, DIRECT_LEVELS),
    )
    instruct_mix = (Part(0.5, False, False, DIRECT_LEVELS), Part(0.5, False, True, DIRECT_LEVELS))
    thinking_mix = (Part(0.7, True, True, THINK_LEVELS), Part(0.3, True, False, THINK_LEVELS))
    s = args.seed
    return [
        Phase("base", args.base_steps, args.lr, min(100, args.base_steps // 10), 0.01, base_mix, 10 * s + 1),
        Phase("instruct", args.ft_steps, args.ft_lr, args.ft_steps // 10, 0.0, instruct_mix, 10 * s + 2),
        Phase("thinking", args.ft_steps, args.ft_lr, args.ft_steps // 10, 0.0, thinking_mix, 10 * s + 3),
    ]


def model_config(args, vocab_size: int, eos: int, pad: int) -> ModelConfig:
    return ModelConfig(
        architecture="qwen3",
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        rms_norm_eps=1e-6,
        rope=RopeConfig(theta=10000.0),
        tie_word_embeddings=True,
        max_position_embeddings=512,
        eos_token_ids=(eos,),
        pad_token_id=pad,
    )


class Batches:
    """Seeded batches for one phase: each batch is one (part, level), right-padded to a multiple
    of 16 tokens; the batch size shrinks with length to keep tokens per step roughly constant."""

    def __init__(self, phase: Phase, tokenizer, tokens_per_batch: int):
        self.phase, self.tok, self.tokens_per_batch = phase, tokenizer, tokens_per_batch
        self.rng = np.random.default_rng([phase.data_seed, 0])
        self.streams = {lvl: toy.problem_stream(phase.data_seed, "train", int(lvl)) for lvl in LEVELS}
        self.weights = np.array([p.weight for p in phase.mixture])
        self.weights /= self.weights.sum()
        self.pad = tokenizer.pad_token_id
        # Fixed shapes per (part, level), from a probe sample, so that the step compiles rarely.
        self.shapes = {}
        for i, part in enumerate(phase.mixture):
            for level in LEVELS:
                probe = toy.generate_problems(256, seed=12345, steps=int(level))
                length = self._bucket(max(len(x) for x in self._encode(probe, part)[0]))
                self.shapes[i, level] = (max(16, min(128, tokens_per_batch // length // 8 * 8)), length)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        i = self.rng.choice(len(self.phase.mixture), p=self.weights)
        part = self.phase.mixture[i]
        level = int(self.rng.choice(LEVELS, p=part.levels / part.levels.sum()))
        batch, length = self.shapes[i, level]
        problems = [next(self.streams[level]) for _ in range(batch)]
        ids, starts = self._encode(problems, part)
        length = max(length, self._bucket(max(len(x) for x in ids)))
        tokens = np.full((batch, length), self.pad, np.int32)
        mask = np.zeros((batch, length), np.float32)
        for i, (row, start) in enumerate(zip(ids, starts)):
            tokens[i, : len(row)] = row
            mask[i, start : len(row)] = 1.0
        return tokens, mask

    @staticmethod
    def _bucket(n: int) -> int:
        return -(-n // 16) * 16

    def _encode(self, problems, part: Part):
        prompts = [prompt_text(p.question, part.opened) for p in problems]
        completions = [toy.completion(p, part.think, part.opened) for p in problems]
        enc = self.tok([a + b for a, b in zip(prompts, completions)], add_special_tokens=False)["input_ids"]
        starts = [len(x) for x in self.tok(prompts, add_special_tokens=False)["input_ids"]]
        return enc, starts


def make_optimizer():
    def build(learning_rate, weight_decay):
        return optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.adamw(learning_rate, b1=0.9, b2=0.98, eps=1e-8, weight_decay=weight_decay),
        )

    return optax.inject_hyperparams(build)(learning_rate=0.0, weight_decay=0.0)


@partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def train_step(cfg: ModelConfig, opt, params, opt_state, tokens, mask):
    loss, grads = jax.value_and_grad(next_token_loss)(params, cfg, tokens, mask)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train_phase(phase: Phase, params, cfg, tokenizer, opt, tokens_per_batch: int) -> tuple[dict, dict]:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, phase.peak_lr, max(phase.warmup, 1), phase.steps, end_value=phase.peak_lr * 0.1
    )
    params = jax.tree.map(jnp.array, params)  # a copy: the step donates its inputs
    opt_state = opt.init(params)
    batches = Batches(phase, tokenizer, tokens_per_batch)
    losses, pending = [], []
    start = time.perf_counter()
    with tqdm(total=phase.steps, desc=f"{phase.name:>8}", unit="step", dynamic_ncols=True) as bar:
        for step in range(phase.steps):
            tokens, mask = batches.next()
            opt_state.hyperparams["learning_rate"] = jnp.asarray(schedule(step), jnp.float32)
            opt_state.hyperparams["weight_decay"] = jnp.asarray(phase.weight_decay, jnp.float32)
            params, opt_state, loss = train_step(cfg, opt, params, opt_state, jnp.asarray(tokens), jnp.asarray(mask))
            pending.append(loss)
            if len(pending) == 10 or step == phase.steps - 1:
                losses += [float(x) for x in pending]
                pending = []
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            bar.update(1)
    seconds = time.perf_counter() - start
    tail = min(50, len(losses))
    stats = {"steps": phase.steps, "seconds": seconds, "final_loss": float(np.mean(losses[-tail:])), "first_loss": losses[0]}
    return params, stats


def evaluate_all(folders: dict[str, Path], n_per_level: int, seed: int) -> dict:
    """Reload the written folders and evaluate instruct, thinking and lam=0.5 (both templates)."""
    problems = toy.toy_benchmark(n_per_level, seed=seed)
    cfg_i, p_i = load_checkpoint(folders["instruct"])
    cfg_t, p_t = load_checkpoint(folders["thinking"])
    assert cfg_i == cfg_t
    tok_i, tok_t = load_tokenizer(folders["instruct"]), load_tokenizer(folders["thinking"])
    mid = interpolate(p_i, p_t, 0.5)
    runs = {
        "instruct": (p_i, tok_i),
        "thinking": (p_t, tok_t),
        "mid (thinking tmpl)": (mid, tok_t),
        "mid (instruct tmpl)": (mid, tok_i),
        "instruct (thinking tmpl)": (p_i, tok_t),
        "thinking (instruct tmpl)": (p_t, tok_i),
    }
    out = {}
    for name, (params, tok) in tqdm(runs.items(), desc="    eval", unit="model"):
        out[name] = summarize_levels(evaluate(params, cfg_i, tok, problems, max_new_tokens=96))
    grid = {}
    for lam in tqdm(LAMBDA_GRID, desc="     lam", unit="lam"):
        theta = interpolate(p_i, p_t, lam)
        for template, tok in (("thinking", tok_t), ("instruct", tok_i)):
            results = evaluate(theta, cfg_i, tok, problems, max_new_tokens=96)
            grid[lam, template] = {
                "accuracy": float(np.mean([r.correct for r in results])),
                "tokens": float(np.mean([r.num_tokens for r in results])),
                "well_formed": float(np.mean([r.well_formed for r in results])),
            }
    return out, grid


def format_grid(grid: dict) -> str:
    lines = ["| lam | " + " | ".join(f"{lam:g}" for lam in LAMBDA_GRID) + " |", "|---|" + "---|" * len(LAMBDA_GRID)]
    for template in ("thinking", "instruct"):
        for key, label, fmt in (("accuracy", "accuracy %", "{:.0f}"), ("tokens", "mean tokens", "{:.1f}")):
            scale = 100 if key == "accuracy" else 1
            row = " | ".join(fmt.format(scale * grid[lam, template][key]) for lam in LAMBDA_GRID)
            lines.append(f"| {template} template: {label} | {row} |")
    return "\n".join(lines)


def format_table(results: dict) -> str:
    levels = sorted(next(iter(results.values())))
    head = "| model | " + " | ".join(f"acc@{lvl}" for lvl in levels) + " | " + " | ".join(f"tok@{lvl}" for lvl in levels)
    head += " | mean tok | well-formed |"
    lines = [head, "|" + "---|" * (2 + 2 * len(levels) + 1)]
    for name, table in results.items():
        acc = " | ".join(f"{100 * table[lvl]['accuracy']:.0f}" for lvl in levels)
        tok = " | ".join(f"{table[lvl]['tokens']:.1f}" for lvl in levels)
        mean_tok = np.mean([table[lvl]["tokens"] for lvl in levels])
        wf = np.mean([table[lvl]["well_formed"] for lvl in levels])
        lines.append(f"| {name} | {acc} | {tok} | {mean_tok:.1f} | {100 * wf:.0f}% |")
    return "\n".join(lines)


def write_folder(folder: Path, cfg: ModelConfig, params, thinking: bool) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    save_hf_checkpoint(folder, cfg, params)
    build_tokenizer(thinking).save_pretrained(str(folder))
    # transformers v5 writes its own class name; v4 (and v5) load the portable alias too.
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    generation = {"eos_token_id": list(cfg.eos_token_ids), "pad_token_id": cfg.pad_token_id, "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def size_on_disk(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def readme(args, argv: list[str], cfg: ModelConfig, n_params: int, stats: dict, results: dict, grid: dict, sizes: dict, total_s: float) -> str:
    cmd = "python scripts/train_toy_pair.py" + ("" if not argv else " " + " ".join(argv))
    phase_rows = "\n".join(
        f"| {name} | {s['steps']} | {s['peak_lr']:g} | {s['seconds'] / 60:.1f} min | {s['first_loss']:.3f} -> {s['final_loss']:.4f} |"
        for name, s in stats.items()
    )
    return f"""# Toy Instruct/Thinking pair

Two tiny **Qwen3-architecture** models, trained from scratch on this machine for DAMI experiments
and tests: `instruct/` (System 1: answers directly) and `thinking/` (System 2: writes a
`<think>` scratchpad first). Both are fine-tunes of one shared base, so
`theta(lam) = theta_instruct + lam * (theta_thinking - theta_instruct)` is meaningful.
Same architecture, same tokenizer (identical ids); only the chat templates differ: the thinking
template appends `<think>\\n` to the generation prompt (Qwen3-2507 Thinking convention).

Made by `{cmd}` (seed {args.seed}) in {total_s / 60:.1f} min wall time on a {os.cpu_count()}-core CPU machine
(jax {jax.__version__}, CPU, float32). On that machine, two runs of the command wrote bit-identical
`model.safetensors`; XLA CPU results can differ across machines in the last bits.

## Task (`dami_jax/toy/task.py`)
Chains like `a=37, b=a+9, c=b*2, d=c-8. d=?` with 1 to 6 steps; operands `+`/`-` 1..{toy.ADD_MAX},
`*` 2..{toy.MUL_MAX}; every value stays in 0..{toy.MAX_VALUE}. From 2 steps on, questions are split
train/test by crc32 (1 in {toy.TEST_FRACTION} held out) and `toy.toy_benchmark(n_per_level, seed)` draws only
held-out ones; the {toy.LEVEL1_QUESTIONS} one-step questions (single operations, which every scratchpad line
also uses) are in both splits.

- instruct: `Answer: 84`
- thinking: (`<think>\\n` from the template) one line per step, e.g. `b=37+9=46\\nc=46*2=92\\nd=92-8=84\\n</think>\\nAnswer: 84`

Also taught, so that behaviour lives in the weights rather than the template: the instruct model
given the thinking template closes the think block at once (`</think>\\nAnswer: N`), and the
thinking model given the plain template opens one itself (`<think>\\n...`).
Grading: the last `Answer: N` after the think block (`dami_jax.evals.grading.extract_answer`).

## Model
Qwen3 (q/k RMSNorm), hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads / {cfg.num_kv_heads} KV heads,
head_dim {cfg.head_dim}, intermediate {cfg.intermediate_size}, tied embeddings, vocab {cfg.vocab_size} (characters + ChatML
specials), max_position_embeddings {cfg.max_position_embeddings}; {n_params:,} parameters, float32.
EOS `<|im_end|>` (id {cfg.eos_token_ids[0]}), pad `<|endoftext|>` (id {cfg.pad_token_id}).
Sizes on disk: instruct {sizes['instruct'] / 1e6:.2f} MB, thinking {sizes['thinking'] / 1e6:.2f} MB.

## Training
Next-token cross-entropy on assistant tokens only; AdamW (b2 0.98, clip 1.0), linear warmup +
cosine decay to 10% of peak; ~{args.tokens_per_batch} tokens per batch (one level and format per batch).
Scratchpad examples draw levels 1..6 uniformly, direct answers weighted 4:2:1:1:1:1.
Base mixture (a hybrid that knows both styles after both templates): 50% scratchpads after the
thinking template, 10% `<think>\\n` + scratchpad after the plain template, 30% direct answers after
the plain template, 10% empty think block + answer after the thinking template. Instruct
fine-tune: direct answers (50% plain template, 50% `</think>\\nAnswer: N` after the thinking
template). Thinking fine-tune: scratchpads (70% thinking template, 30% plain template, opening
`<think>` itself). No weight decay in the fine-tunes.

| phase | steps | peak lr | time | loss (first -> mean of last 50) |
|---|---|---|---|---|
{phase_rows}

## Benchmark accuracy (%) and mean generated tokens (stop token included), greedy
{args.eval_n} problems per level (`toy.toy_benchmark({args.eval_n}, seed={args.seed})`); "mid" is lam = 0.5. Each
model uses its own chat template unless noted. Levels 2..6 are held-out questions; level 1 (single
operations) is not separable from training.

{format_table(results)}

Along the interpolation path theta(lam), all levels together (the same {6 * args.eval_n} problems), each
template used for every lam:

{format_grid(grid)}
"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="default: dami_jax/toy/toy-pair (runs/toy_pair_quick with --quick)")
    ap.add_argument("--quick", action="store_true", help="a short trial run")
    ap.add_argument("--base-steps", type=int, default=None)
    ap.add_argument("--ft-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ft-lr", type=float, default=5e-4)
    ap.add_argument("--tokens-per-batch", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--eval-n", type=int, default=None, help="benchmark problems per level")
    ap.add_argument("--save-base", type=Path, default=None, help="also write the base model (HF folder) here")
    ap.add_argument("--base", type=Path, default=None, help="start from this saved base instead of training one")
    args = ap.parse_args(argv)
    if args.base_steps is None:
        args.base_steps = 150 if args.quick else 3000
    if args.ft_steps is None:
        args.ft_steps = 30 if args.quick else 400
    if args.eval_n is None:
        args.eval_n = 20 if args.quick else 100
    out = args.out or (ROOT / "runs" / "toy_pair_quick" if args.quick else PAIR_DIR)
    t0 = time.perf_counter()

    tokenizer = build_tokenizer(thinking=True)
    cfg = model_config(args, len(tokenizer), tokenizer.convert_tokens_to_ids(IM_END), tokenizer.pad_token_id)
    params = init_params(cfg, jax.random.key(args.seed))
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    print(f"model: {n_params:,} params; {cfg}")
    opt = make_optimizer()

    stats, trained = {}, {}
    plan = phases(args)
    if args.base is not None:  # for iterating on the fine-tunes; the shipped pair trains its base
        base_cfg, base = load_checkpoint(args.base)
        assert base_cfg == cfg, f"{args.base} does not match the model flags"
        stats["base"] = json.loads((args.base / "train_stats.json").read_text())
    else:
        base, stats["base"] = train_phase(plan[0], params, cfg, tokenizer, opt, args.tokens_per_batch)
    if args.save_base is not None:
        write_folder(args.save_base, cfg, base, thinking=True)
        (args.save_base / "train_stats.json").write_text(json.dumps(stats["base"]) + "\n")
    for phase in plan[1:]:
        trained[phase.name], stats[phase.name] = train_phase(phase, base, cfg, tokenizer, opt, args.tokens_per_batch)
    for phase in plan:
        stats[phase.name]["peak_lr"] = phase.peak_lr
        print(f"{phase.name}: {stats[phase.name]['seconds']:.0f} s, loss {stats[phase.name]['first_loss']:.3f} -> {stats[phase.name]['final_loss']:.4f}")

    folders = {name: out / name for name in ("instruct", "thinking")}
    for name, folder in folders.items():
        write_folder(folder, cfg, trained[name], thinking=name == "thinking")
    sizes = {name: size_on_disk(folder) for name, folder in folders.items()}

    t_eval = time.perf_counter()
    results, grid = evaluate_all(folders, args.eval_n, args.seed)
    print(f"evaluation: {time.perf_counter() - t_eval:.0f} s")
    total = time.perf_counter() - t0
    print(format_table(results))
    print(format_grid(grid))
    (out / "README.md").write_text(readme(args, argv, cfg, n_params, stats, results, grid, sizes, total))
    print(f"wrote {out} ({sum(sizes.values()) / 1e6:.2f} MB of models) in {total / 60:.1f} min")


if __name__ == "__main__":
    main()
