"""``dj.serve``: a list of prompts, each on its own theta(lambda_i), through the engine."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dami_jax.dami.pair import ModelPair
from dami_jax.dami.serving import check_lambdas, row_keys, stop_rows
from dami_jax.decoding.cache import CacheConfig, DenseCacheConfig
from dami_jax.decoding.generation import PROMPT_BUCKET, Generation
from dami_jax.decoding.sampling import GREEDY, Sampling
from dami_jax.engine.cache import RowLayout
from dami_jax.engine.engine import THETA_CACHE, Engine, tree_bytes
from dami_jax.engine.memory import size_engine
from dami_jax.engine.placement import mesh_free_memory, mesh_of
from dami_jax.engine.tailorkv_slots import tailorkv_slot_bytes
from dami_jax.errors import InputError
from dami_jax.tailorkv.cache import TailorKVConfig

MAX_DEFAULT_SLOTS = 64  # dj.serve's default slot count never exceeds this (nor the number of prompts, nor what fits)


def serve(
    pair: ModelPair,
    prompts: Sequence[Sequence[int]],
    lambdas: Sequence[float],
    *,
    max_new_tokens: int | Sequence[int] = 128,
    sampling: Sampling = GREEDY,
    key: jax.Array | None = None,
    stop_tokens: Sequence[int] | Sequence[Sequence[int]] | None = None,
    slots: int | None = None,
    cache: CacheConfig = DenseCacheConfig(),
    progress: bool = False,
    extrapolate: bool = False,
    **engine_options: Any,
) -> Generation:
    """Generate for each prompt (rendered token ids) on theta(lambdas[i]), at most ``slots`` at a
    time with continuous batching (:class:`~dami_jax.engine.engine.Engine`); rows in ``prompts``'
    order, ``tokens`` as wide as the largest budget.

    ``max_new_tokens``: one budget, or one per prompt. ``key``: one PRNG key, split into one per
    prompt, or one per prompt [B]; either way a row's tokens depend on its own key only.
    ``stop_tokens``: shared or per prompt (default: the pair's EOS ids). ``cache``: dense or a
    ``dj.TailorKVConfig`` (each slot a TailorKV row; its store of generated tokens holds the
    largest budget). ``slots``: default one
    per prompt, at most ``MAX_DEFAULT_SLOTS`` and what fits in memory
    (:func:`~dami_jax.engine.memory.size_engine`). ``engine_options``: the engine's other settings (``steps_per_call``,
    ``theta_cache``, ...); ``admission`` defaults to ``"lambda"`` here (every prompt is known up
    front, so the slots may walk the lambdas in order). Every argument and prompt is checked
    before any work.
    """
    count = len(prompts)
    if count == 0:
        raise InputError("prompts: need at least one prompt")
    lam = check_lambdas(lambdas, count, extrapolate)
    budgets = _per_prompt(max_new_tokens, count, "max_new_tokens")
    stops = stop_rows(stop_tokens, count) or [stop_tokens] * count
    keys = row_keys(key, sampling, count)
    max_len = -(-max(len(p) for p in prompts) // PROMPT_BUCKET) * PROMPT_BUCKET + max(int(b) for b in budgets)
    max_len = min(max_len, pair.cfg.max_position_embeddings)
    tailorkv = isinstance(cache, TailorKVConfig)
    if tailorkv:  # the slots' device stores of generated tokens hold the largest budget
        engine_options.setdefault("max_new_tokens", max(int(b) for b in budgets))
    if slots is None:
        dtype = jax.tree.leaves(pair.instruct)[0].dtype
        thetas = engine_options.get("theta_cache", THETA_CACHE) * tree_bytes(pair.instruct)
        layout = engine_options.get("layout", RowLayout())
        slot_bytes = tailorkv_slot_bytes(pair.cfg, cache, engine_options["max_new_tokens"], dtype) if tailorkv else None
        mesh = engine_options.get("mesh") or mesh_of(pair)
        slots = size_engine(pair.cfg, dtype.itemsize, thetas, None, max_len, layout, most_slots=min(count, MAX_DEFAULT_SLOTS),
                            slot_bytes=slot_bytes, free=None if mesh is None else mesh_free_memory(pair.cfg, mesh)).slots  # fmt: skip
    engine_options.setdefault("admission", "lambda")
    engine = Engine(pair, slots=slots, max_len=max_len, extrapolate=extrapolate, cache=cache, **engine_options)
    for i, prompt in enumerate(prompts):
        try:
            engine.submit(prompt, lam=lam[i], max_new_tokens=budgets[i], sampling=sampling,
                          key=None if keys is None else keys[i], stop_tokens=stops[i])  # fmt: skip
        except InputError as error:
            raise InputError(f"prompt {i}: {error}") from None
    results = sorted(tqdm(engine.results(), total=count, desc="serve", unit="answer", disable=not progress), key=lambda r: r.id)
    width = max(int(b) for b in budgets)
    tokens = np.full((count, width), pair.cfg.pad_token_id, np.int32)
    logprobs = np.zeros((count, width), np.float32)
    for row, result in enumerate(results):
        tokens[row, : len(result.tokens)] = result.tokens
        logprobs[row, : len(result.tokens)] = result.logprobs
    lengths = np.asarray([len(r.tokens) for r in results], np.int32)
    return Generation(jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(logprobs))


def _per_prompt(value: int | Sequence[int], count: int, name: str) -> list[int]:
    if isinstance(value, (int, np.integer)):
        return [int(value)] * count
    values = list(value)
    if len(values) != count:
        raise InputError(f"{name}: need one value or one per prompt ({count}), got {len(values)}")
    return values
