"""Needle in a haystack for KV-cache configs: the runner and its summary.

:func:`run_niah` scores cache configs on a (length x depth) grid of :mod:`cases
<dami_jax.evals.niah.cases>` (needles of mixed forms) with:

- accuracy: the needle's value appears in the greedy answer (EOS-stopped);
- teacher-forced comparison with dense along the dense greedy continuation (its first
  ``kl_tokens`` tokens): the mean KL(dense || config) of next-token distributions, and top-1
  agreement, the fraction of those steps where the config's argmax is dense's token. Both come
  from the same forced distributions, so they isolate the cache's error from path divergence;
- free-running agreement: the fraction of the config's own greedy tokens equal to dense's (one
  early difference sends the rest down another path, so it is far noisier).

dami-jax configs (dense, TailorKV presets) share one full-precision prefill per case;
transformers' quantized KV cache (:mod:`quanto <dami_jax.evals.niah.quanto>`) runs in torch and
is compared against the dami-jax dense distributions. Results resume like sweeps do
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
from dami_jax.evals.niah.cases import KEY_FORMS, VALUE_FORMS, build_niah, case_seed, needle_found
from dami_jax.evals.niah.quanto import QUANTO_CONFIGS, TransformersQuanto, describe_quanto
from dami_jax.evals.plots import plot_niah
from dami_jax.evals.records import ResultsFolder
from dami_jax.files import write_atomic
from dami_jax.models.checkpoint import load_checkpoint
from dami_jax.models.config import read_hf_config
from dami_jax.models.params import fingerprint
from dami_jax.models.tokenizer import load_tokenizer
from dami_jax.tailorkv.cache import PRESETS, TOKEN_SCORES, TailorKVConfig
from dami_jax.tailorkv.profiling import quantized_layers_for

DAMI_CONFIGS = ("dense", *PRESETS)
CONFIG_NAMES = DAMI_CONFIGS + tuple(QUANTO_CONFIGS)
DEPTHS = tuple(round(0.05 + 0.1 * i, 2) for i in range(10))  # 0.05, 0.15, ..., 0.95
LOG_FILE = "niah.jsonl"
# What a record means: bump when the cases (build_niah) or the record fields change, so that
# folders made before are refused instead of mixed (v2: needles of mixed forms, top-1 agreement).
NIAH_VERSION = 2
REQUIRED_SETTINGS = ("niah_version",)  # see ResultsFolder.check


def cache_config(name: str, quantized_layers: Sequence[int], token_score: str = TailorKVConfig.token_score):
    """A dami-jax cache config by name; ``quantized_layers`` and ``token_score`` for the TailorKV presets."""
    if name == "dense":
        return DenseCacheConfig()
    if name in PRESETS:
        return dataclasses.replace(PRESETS[name], quantized_layers=tuple(quantized_layers), token_score=token_score)
    raise InputError(f"unknown dami-jax cache config {name!r}; known: {DAMI_CONFIGS}")


def check_niah_args(lengths: Sequence[int], depths: Sequence[float], configs: Sequence[str], max_new_tokens: int, kl_tokens: int,
                    token_score: str = TailorKVConfig.token_score) -> None:  # fmt: skip
    """Raise InputError naming the first argument a NIAH run cannot use."""
    unknown = [c for c in configs if c not in CONFIG_NAMES]
    if unknown or not configs:
        raise InputError(f"configs: unknown {unknown or 'none given'}; known: {', '.join(CONFIG_NAMES)}")
    if token_score not in TOKEN_SCORES:
        raise InputError(f"token_score: unknown {token_score!r}; known: {', '.join(TOKEN_SCORES)}")
    if min(max_new_tokens, kl_tokens) < 1:
        raise InputError(f"max_new_tokens={max_new_tokens} and kl_tokens={kl_tokens} must be >= 1")
    if not lengths or min(lengths) < 1:
        raise InputError(f"lengths: need positive token counts, got {list(lengths)}")
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        raise InputError(f"depths: need fractions in [0, 1], got {list(depths)}")


def niah_settings(model_path: str | Path, configs: Sequence[str], max_new_tokens: int, kl_tokens: int, seed: int,
                  quantized_layers: Sequence[int] | None, token_score: str = TailorKVConfig.token_score) -> dict[str, Any]:  # fmt: skip
    """What changes a NIAH record besides the weights; TailorKV's layer split (resolved from the
    model's profile when not given) and token score only when a TailorKV config runs."""
    settings: dict[str, Any] = {"niah_version": NIAH_VERSION, "max_new_tokens": max_new_tokens, "kl_tokens": kl_tokens, "seed": seed}
    if any(c in PRESETS for c in configs):
        if quantized_layers is None:
            quantized_layers = quantized_layers_for(model_path, read_hf_config(Path(model_path)).num_layers)
        settings["quantized_layers"] = sorted(quantized_layers)
        settings["token_score"] = token_score
    return settings


def compare_forced(reference_tokens, reference_logprobs, logprobs) -> dict[str, float]:
    """A config's teacher-forced distributions (float [N, V], row t predicting
    ``reference_tokens[t]``) against dense's (``reference_logprobs``, whose argmax path is
    ``reference_tokens`` int [N]): mean and max KL(dense || config), and top-1 agreement."""
    kl = kl_divergence(reference_logprobs, logprobs)
    top1 = np.argmax(np.asarray(logprobs), axis=-1) == np.asarray(reference_tokens)
    return {"kl": float(np.mean(kl)), "kl_max": float(np.max(kl)), "top1": float(np.mean(top1))}


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
    depths: Sequence[float] = DEPTHS,
    configs: Sequence[str] = CONFIG_NAMES,
    out_dir: str | Path = "runs/niah",
    *,
    max_new_tokens: int = 48,
    kl_tokens: int = 64,
    seed: int = 0,
    quantized_layers: Sequence[int] | None = None,
    token_score: str = TailorKVConfig.token_score,
    torch_threads: int | None = None,
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """Score ``configs`` on every (length, depth); returns this grid's records.

    Records are appended to ``out_dir/niah.jsonl`` as they finish, and finished (config, length,
    depth) cells are skipped on a rerun; ``out_dir/settings.json`` refuses a rerun with other
    settings (``ResultsFolder(out_dir).start_fresh()`` moves old results aside). Writes ``summary.txt`` and
    the plot ``niah.png``. ``quantized_layers`` (TailorKV's quantized, dense-attention layers)
    default to the model's layer profile (:func:`dami_jax.tailorkv.profiling.quantized_layers_for`);
    ``token_score`` is the TailorKV presets' (:class:`TailorKVConfig`). The default
    ``max_new_tokens`` leaves room for a UUID answer. ``torch_threads``: see
    :class:`TransformersQuanto` (the quanto configs run in torch).
    """
    check_niah_args(lengths, depths, configs, max_new_tokens, kl_tokens, token_score)
    settings = niah_settings(model_path, configs, max_new_tokens, kl_tokens, seed, quantized_layers, token_score)
    folder = ResultsFolder(out_dir)
    folder.check(settings, REQUIRED_SETTINGS)
    cfg, params = load_checkpoint(model_path)
    weights = {"model_weights": fingerprint(params), "dtype": str(jax.tree.leaves(params)[0].dtype)}
    folder.claim({**settings, **weights}, REQUIRED_SETTINGS)
    tokenizer = load_tokenizer(model_path)
    caches = {c: cache_config(c, settings.get("quantized_layers", ()), token_score) for c in configs if c in DAMI_CONFIGS}
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
        forced_path = dense_tokens[:kl_tokens]
        dense_logprobs = np.asarray(dense_logprobs)[0, :kl_tokens]
        reference_s = time.perf_counter() - started
        base = {"length": length, "depth": depth, "seed": seed, "prompt_tokens": len(case.tokens),
                "needle_depth": round(case.needle_depth, 4), "answer": case.answer, "key": case.key,
                "key_form": case.form.key, "value_form": case.form.value}  # fmt: skip
        for name in pending:
            started = time.perf_counter()
            if name == "dense":
                tokens, forced = dense_tokens, dense_logprobs
            elif name in caches:
                tokens = np.asarray(greedy_from(params, cfg, prefilled, caches[name], steps)[0])[0]
                forced = np.asarray(forced_from(params, cfg, prefilled, caches[name], forced_path[None]))[0]
            else:
                quanto = quanto or TransformersQuanto(model_path, torch_threads, progress=verbose)
                nbits = QUANTO_CONFIGS[name]
                tokens = np.asarray(quanto.greedy(case.tokens, nbits, steps))
                forced = quanto.forced_logprobs(case.tokens, nbits, forced_path.tolist())
            described = describe_quanto(QUANTO_CONFIGS[name]) if name in QUANTO_CONFIGS else {
                "type": type(caches[name]).__name__, **dataclasses.asdict(caches[name])}  # fmt: skip
            response = _response(tokenizer, tokens, eos, max_new_tokens)
            same = tokens[:kl_tokens] == forced_path
            prefix = int(same.size if same.all() else np.argmin(same))  # leading tokens equal to dense
            yield [{
                **base, "config": name, "cache": described,
                "correct": needle_found(case.answer, response), "response": response,
                **compare_forced(forced_path, dense_logprobs, forced), "kl_tokens": kl_tokens,
                "free_agreement": float(np.mean(same)), "free_prefix": prefix,
                "tokens": [int(t) for t in tokens], "seconds": round(time.perf_counter() - started, 2),
                "reference_seconds": round(reference_s, 2),
            }]  # fmt: skip

    cells = list(dict.fromkeys((int(n), round(float(d), 6)) for n in lengths for d in depths))
    records = run_grid(folder.log(LOG_FILE), cells, list(configs), _key, work, desc="niah", unit="case",
                       describe=lambda cell: f"{cell[0]} tokens, depth {cell[1]:g}", progress=verbose)  # fmt: skip
    rows = niah_summary(records)
    tailorkv = f"TailorKV: quantized layers {settings['quantized_layers']}, token score {token_score}" if "token_score" in settings else ""
    table = "\n\n".join(part for part in (tailorkv, format_summary(rows), format_forms(records)) if part)
    write_atomic(folder.path / "summary.txt", table + "\n")
    plot_niah(records, rows, folder.path / "niah.png", CONFIG_NAMES, subtitle=tailorkv)
    if verbose:
        print(table)
    return records


def _by_config(records: Iterable[dict[str, Any]], *fields: str) -> list[tuple[tuple[Any, ...], list[dict[str, Any]]]]:
    """Records grouped by (config, *fields), in config (CONFIG_NAMES) then field order."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["config"], *(r[f] for f in fields))].append(r)
    order = {c: i for i, c in enumerate(CONFIG_NAMES)}
    return sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], len(order)), *kv[0]))


def niah_summary(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (config, length), in config then length order: means of accuracy, top-1
    agreement, KL and free-running agreement."""
    rows = []
    for (config, length), rs in _by_config(records, "length"):
        mean = lambda field: float(np.mean([r[field] for r in rs]))  # noqa: E731
        rows.append({
            "config": config, "length": int(length), "n": len(rs), "accuracy": mean("correct"), "top1": mean("top1"),
            "kl": mean("kl"), "free_agreement": mean("free_agreement"), "seconds": mean("seconds"),
            "reference_seconds": mean("reference_seconds"),
        })  # fmt: skip
    return rows


def format_summary(rows: Sequence[dict[str, Any]]) -> str:
    """``top-1`` and ``KL``: teacher-forced along dense's greedy path; ``free agr.``: free-running
    greedy tokens equal to dense's; ``s/case``: the config's own time per case; ``dense s``: the
    shared dense prefill and greedy reference every config is compared with (run once per case)."""
    lines = [
        f"{'config':<12} {'length':>6} {'accuracy':>8} {'top-1':>6} {'KL(dense||cfg)':>14} {'free agr.':>9} "
        f"{'s/case':>7} {'dense s':>7} {'n':>3}"
    ]
    for r in rows:
        lines.append(
            f"{r['config']:<12} {r['length']:>6d} {r['accuracy']:>8.2f} {r['top1']:>6.3f} {r['kl']:>14.4g} "
            f"{r['free_agreement']:>9.3f} {r['seconds']:>7.1f} {r['reference_seconds']:>7.1f} {r['n']:>3d}"
        )
    return "\n".join(lines)


def format_forms(records: Sequence[dict[str, Any]]) -> str:
    """Needles found / cases per config and needle form (all lengths and depths): a column per
    value form, then per key form."""
    columns = [("value_form", f) for f in VALUE_FORMS] + [("key_form", f) for f in KEY_FORMS]
    width = 7
    lines = [
        f"{'needles found':<12}  {'value form':<{width * len(VALUE_FORMS)}}  key form",
        f"{'config':<12} " + "".join(f"{form:>{width}}" + (" " if i == len(VALUE_FORMS) - 1 else "") for i, (_, form) in enumerate(columns)),
    ]
    for (config,), rs in _by_config(records):
        cells = []
        for i, (kind, form) in enumerate(columns):
            hits = [r["correct"] for r in rs if r[kind] == form]
            cells.append((f"{sum(hits)}/{len(hits)}" if hits else "-").rjust(width) + (" " if i == len(VALUE_FORMS) - 1 else ""))
        lines.append(f"{config:<12} " + "".join(cells))
    return "\n".join(lines)
