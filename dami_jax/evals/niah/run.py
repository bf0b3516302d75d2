"""Needle in a haystack for KV-cache configs: the runner and its summary.

:func:`run_niah` scores cache configs on a (length x depth) grid of :mod:`cases
<dami_jax.evals.niah.cases>`: accuracy (the number appears in the greedy answer, EOS-stopped),
greedy-token agreement with the dense cache over the first ``kl_tokens`` tokens, and the mean
KL(dense || config) of next-token distributions along the dense greedy continuation
(teacher-forced). dami-jax configs (dense, TailorKV presets) share one full-precision prefill per
case; transformers' quantized KV cache (:mod:`quanto <dami_jax.evals.niah.quanto>`) runs in torch
and is compared against the dami-jax dense distributions. Results resume like sweeps do
(:mod:`dami_jax.evals.records`), and never mix in results made with other settings.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import jax
import numpy as np

from dami_jax.decoding.cache import DenseCacheConfig
from dami_jax.decoding.scoring import forced_from, greedy_from, kl_divergence, prefill_dense
from dami_jax.errors import InputError
from dami_jax.evals.grid import run_grid
from dami_jax.evals.niah.cases import build_niah, case_seed, needle_found
from dami_jax.evals.niah.quanto import QUANTO_CONFIGS, TransformersQuanto, describe_quanto
from dami_jax.evals.plots import plot_niah
from dami_jax.evals.records import ResultsFolder
from dami_jax.files import write_atomic
from dami_jax.models.checkpoint import load_checkpoint
from dami_jax.models.config import read_hf_config
from dami_jax.models.params import fingerprint
from dami_jax.models.tokenizer import load_tokenizer
from dami_jax.tailorkv.cache import PRESETS
from dami_jax.tailorkv.profiling import quantized_layers_for

DAMI_CONFIGS = ("dense", *PRESETS)
CONFIG_NAMES = DAMI_CONFIGS + tuple(QUANTO_CONFIGS)
LOG_FILE = "niah.jsonl"


def cache_config(name: str, quantized_layers: Sequence[int]):
    """A dami-jax cache config by name; ``quantized_layers`` for the TailorKV presets."""
    if name == "dense":
        return DenseCacheConfig()
    if name in PRESETS:
        return dataclasses.replace(PRESETS[name], quantized_layers=tuple(quantized_layers))
    raise InputError(f"unknown dami-jax cache config {name!r}; known: {DAMI_CONFIGS}")


def check_niah_args(lengths: Sequence[int], depths: Sequence[float], configs: Sequence[str], max_new_tokens: int, kl_tokens: int) -> None:
    """Raise InputError naming the first argument a NIAH run cannot use."""
    unknown = [c for c in configs if c not in CONFIG_NAMES]
    if unknown or not configs:
        raise InputError(f"configs: unknown {unknown or 'none given'}; known: {', '.join(CONFIG_NAMES)}")
    if min(max_new_tokens, kl_tokens) < 1:
        raise InputError(f"max_new_tokens={max_new_tokens} and kl_tokens={kl_tokens} must be >= 1")
    if not lengths or min(lengths) < 1:
        raise InputError(f"lengths: need positive token counts, got {list(lengths)}")
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        raise InputError(f"depths: need fractions in [0, 1], got {list(depths)}")


def niah_settings(model_path: str | Path, configs: Sequence[str], max_new_tokens: int, kl_tokens: int, seed: int,
                  quantized_layers: Sequence[int] | None) -> dict[str, Any]:  # fmt: skip
    """What changes a NIAH record besides the weights; TailorKV's layer split only when a TailorKV
    config runs (resolved from the model's profile when not given)."""
    settings: dict[str, Any] = {"max_new_tokens": max_new_tokens, "kl_tokens": kl_tokens, "seed": seed}
    if any(c in PRESETS for c in configs):
        if quantized_layers is None:
            quantized_layers = quantized_layers_for(model_path, read_hf_config(Path(model_path)).num_layers)
        settings["quantized_layers"] = sorted(quantized_layers)
    return settings


def _key(r: dict[str, Any]) -> tuple[tuple[int, float], str]:
    return (int(r["length"]), round(float(r["depth"]), 6)), r["config"]


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
    depth) cells are skipped on a rerun; ``out_dir/settings.json`` refuses a rerun with other
    settings (``ResultsFolder(out_dir).start_fresh()`` moves old results aside). Writes ``summary.txt`` and
    the heat map ``niah.png``. ``quantized_layers`` (TailorKV's quantized, dense-attention layers)
    default to the model's layer profile (:func:`dami_jax.tailorkv.profiling.quantized_layers_for`).
    ``torch_threads``: see :class:`TransformersQuanto` (the quanto configs run in torch).
    """
    check_niah_args(lengths, depths, configs, max_new_tokens, kl_tokens)
    settings = niah_settings(model_path, configs, max_new_tokens, kl_tokens, seed, quantized_layers)
    folder = ResultsFolder(out_dir)
    folder.check(settings)
    cfg, params = load_checkpoint(model_path)
    folder.claim({**settings, "model_weights": fingerprint(params), "dtype": str(jax.tree.leaves(params)[0].dtype)})
    tokenizer = load_tokenizer(model_path)
    caches = {c: cache_config(c, settings.get("quantized_layers", ())) for c in configs if c in DAMI_CONFIGS}
    quanto: TransformersQuanto | None = None  # created on first use: loading torch is slow
    steps = max(max_new_tokens, kl_tokens)
    eos = tuple(cfg.eos_token_ids)

    def work(cell: tuple[int, float], pending: list[str]) -> Iterator[list[dict[str, Any]]]:
        nonlocal quanto
        length, depth = cell
        case = build_niah(tokenizer, length, depth, case_seed(seed, length, depth), reserve=steps)
        started = time.perf_counter()
        prefilled = prefill_dense(params, cfg, [case.tokens], steps)
        dense_tokens, dense_logprobs = greedy_from(params, cfg, prefilled, DenseCacheConfig(), steps)
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
                tokens = np.asarray(greedy_from(params, cfg, prefilled, caches[name], steps)[0])[0]
                forced = forced_from(params, cfg, prefilled, caches[name], dense_tokens[None, :kl_tokens])
                kl = kl_divergence(dense_logprobs, np.asarray(forced)[0])
            else:
                quanto = quanto or TransformersQuanto(model_path, torch_threads, progress=verbose)
                nbits = QUANTO_CONFIGS[name]
                tokens = np.asarray(quanto.greedy(case.tokens, nbits, steps))
                kl = kl_divergence(dense_logprobs, quanto.forced_logprobs(case.tokens, nbits, dense_tokens[:kl_tokens].tolist()))
            described = describe_quanto(QUANTO_CONFIGS[name]) if name in QUANTO_CONFIGS else {
                "type": type(caches[name]).__name__, **dataclasses.asdict(caches[name])}  # fmt: skip
            response = _response(tokenizer, tokens, eos, max_new_tokens)
            same = tokens[:kl_tokens] == dense_tokens[:kl_tokens]
            prefix = int(same.size if same.all() else np.argmin(same))  # leading tokens equal to dense
            yield [{
                **base, "config": name, "cache": described,
                "correct": needle_found(case.answer, response), "response": response,
                "agreement": float(np.mean(same)), "agree_prefix": prefix,
                "kl": float(np.mean(kl)), "kl_max": float(np.max(kl)), "kl_tokens": kl_tokens,
                "tokens": [int(t) for t in tokens], "seconds": round(time.perf_counter() - started, 2),
                "reference_seconds": round(reference_s, 2),
            }]  # fmt: skip

    cells = list(dict.fromkeys((int(n), round(float(d), 6)) for n in lengths for d in depths))
    records = run_grid(folder.log(LOG_FILE), cells, list(configs), _key, work, desc="niah", unit="case",
                       describe=lambda cell: f"{cell[0]} tokens, depth {cell[1]:g}", progress=verbose)  # fmt: skip
    table = format_summary(niah_summary(records))
    write_atomic(folder.path / "summary.txt", table + "\n")
    plot_niah(records, folder.path / "niah.png", CONFIG_NAMES)
    if verbose:
        print(table)
    return records


def niah_summary(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
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
