"""Teacher-forced scoring through a decode-time cache.

:func:`teacher_forced_logprobs` answers "what would the model, decoding with this cache, predict
at each step of this given continuation": the prompt goes through exactly what
:func:`dami_jax.generate` does (left padding, chunked prefill on a dense cache, then the cache
config's ``after_prefill``), and then the continuation is fed one token per step (a jitted
``lax.scan``) through the same single-token decode step. Comparing these distributions with the
dense cache's along one fixed continuation isolates the cache's error from the divergence of
sampled paths.

For evaluations that score several caches on one prompt, :func:`prefill_dense` runs the
(expensive) prefill once and :func:`greedy_from` / :func:`forced_from` start each cache from
that dense cache: prefill always runs in full precision, so every cache config sees the same
prefilled state.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dami_jax.decoding.cache import CacheConfig, DenseCacheConfig, DenseKVCache
from dami_jax.decoding.generation import build_cache, decode_step, prepare_prompts, start_decoding
from dami_jax.models.config import ModelConfig
from dami_jax.models.model import decoder, lm_logits
from dami_jax.models.params import Params


def _forced_tokens(cfg: ModelConfig, batch: int, continuations) -> jax.Array:
    forced = np.asarray(continuations)
    if forced.ndim != 2 or forced.shape[0] != batch or forced.shape[1] == 0:
        raise ValueError(
            f"continuations: need one non-empty row of equal length per prompt ({batch} rows), got shape {forced.shape}"
        )
    if not np.issubdtype(forced.dtype, np.integer) or forced.min() < 0 or forced.max() >= cfg.vocab_size:
        raise ValueError(f"continuations: token ids must be integers in [0, {cfg.vocab_size})")
    return jnp.asarray(forced, jnp.int32)


def _force(params, cfg: ModelConfig, logits: jax.Array, cache, forced: jax.Array) -> jax.Array:
    """Log-softmax of ``logits`` (predicting forced[:, 0]), then of each step fed forced[:, t]."""

    def step(cache, token):
        logits, cache = decode_step(params, cfg, token, cache)
        return cache, jax.nn.log_softmax(logits)

    _, rest = jax.lax.scan(step, cache, forced[:, :-1].T)  # [N - 1, B, V]
    return jnp.concatenate([jax.nn.log_softmax(logits)[:, None], rest.swapaxes(0, 1)], axis=1)


@partial(jax.jit, static_argnames=("cfg", "cache_size", "cache_config"))
def _teacher_forced(params, tokens, start, forced, *, cfg, cache_size, cache_config) -> jax.Array:
    logits, cache = start_decoding(params, cfg, tokens, start, cache_size, cache_config)
    return _force(params, cfg, logits, cache, forced)


def teacher_forced_logprobs(
    params: Params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    cache: CacheConfig = DenseCacheConfig(),
) -> jax.Array:
    """float32 [B, N, V]: at step t, log p(. | prompt + continuation[:t]) as decoded with ``cache``.

    ``continuations`` is int [B, N] (one row per prompt, equal lengths). Row t is the
    distribution that predicts continuation[t]; the last continuation token is never fed.
    """
    forced = _forced_tokens(cfg, len(prompts), continuations)
    tokens, start, cache_size = prepare_prompts(prompts, cfg, forced.shape[1])
    return _teacher_forced(params, tokens, start, forced, cfg=cfg, cache_size=cache_size, cache_config=cache)


def next_token_loss(params: Params, cfg: ModelConfig, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats) of tokens int32 [B, T], over the positions where
    ``loss_mask`` [B, T] marks the *target* token (e.g. the completion, not the prompt). One full
    causal pass without a cache; differentiable (training) and traceable (evaluation)."""
    hidden, _ = decoder(params, cfg, tokens[:, :-1])
    logprobs = jax.nn.log_softmax(lm_logits(params, hidden))
    nll = -jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]
    weight = jnp.asarray(loss_mask)[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def kl_divergence(p_logprobs, q_logprobs) -> np.ndarray:
    """KL(p || q) over the last axis, from log-probabilities (float64 numpy, shape [...])."""
    p, q = np.asarray(p_logprobs, np.float64), np.asarray(q_logprobs, np.float64)
    return np.sum(np.exp(p) * (p - q), axis=-1)


# --------------------------------------------------------------------------- one prefill, many caches


@flax.struct.dataclass
class Prefilled:
    """A prompt batch prefilled once on a dense cache (what every cache config starts from)."""

    logits: jax.Array  # float32 [B, V]: predicts the first new token
    cache: DenseKVCache  # prompt slots written; room for ``cache.size - prompt_len`` more tokens
    prompt_len: int = flax.struct.field(pytree_node=False)  # padded prompt length

    @property
    def room(self) -> int:
        return self.cache.size - self.prompt_len


def prefill_dense(params: Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> Prefilled:
    """Left-pad and prefill as :func:`dami_jax.generate` does, leaving room for ``max_new_tokens``."""
    tokens, start, cache_size = prepare_prompts(prompts, cfg, max_new_tokens)
    logits, cache = build_cache(params, tokens, start, cfg=cfg, cache_size=cache_size)
    return Prefilled(logits=logits, cache=cache, prompt_len=int(tokens.shape[1]))


def _check_room(prefilled: Prefilled, steps: int) -> None:
    if not 1 <= steps <= prefilled.room:
        raise ValueError(f"steps={steps}: the prefilled cache has room for 1..{prefilled.room} new tokens")


@partial(jax.jit, static_argnames=("cfg", "cache_config", "steps", "prompt_len"))
def _greedy(params, logits, dense, *, cfg, cache_config, steps, prompt_len):
    cache = cache_config.after_prefill(cfg, dense, prompt_len)

    def step(carry, _):
        logits, cache = carry
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logprobs = jax.nn.log_softmax(logits)
        return decode_step(params, cfg, token, cache), (token, logprobs)

    # The last step's decode is wasted work, but keeps the scan body uniform.
    _, (tokens, logprobs) = jax.lax.scan(step, (logits, cache), length=steps)
    return tokens.T, logprobs.swapaxes(0, 1)


def greedy_from(
    params: Params, cfg: ModelConfig, prefilled: Prefilled, cache: CacheConfig, steps: int
) -> tuple[jax.Array, jax.Array]:
    """Greedy decoding of ``steps`` tokens with ``cache`` from a shared prefill, never stopping.

    Returns (tokens int32 [B, steps], log-softmax float32 [B, steps, V] of each step's
    distribution); the tokens are what ``generate(..., stop_tokens=[], cache=cache)`` returns.
    """
    _check_room(prefilled, steps)
    return _greedy(
        params, prefilled.logits, prefilled.cache,
        cfg=cfg, cache_config=cache, steps=steps, prompt_len=prefilled.prompt_len,
    )  # fmt: skip


@partial(jax.jit, static_argnames=("cfg", "cache_config", "prompt_len"))
def _forced_from(params, logits, dense, forced, *, cfg, cache_config, prompt_len):
    return _force(params, cfg, logits, cache_config.after_prefill(cfg, dense, prompt_len), forced)


def forced_from(params: Params, cfg: ModelConfig, prefilled: Prefilled, cache: CacheConfig, continuations) -> jax.Array:
    """:func:`teacher_forced_logprobs` from a shared prefill: float32 [B, N, V]."""
    forced = _forced_tokens(cfg, prefilled.logits.shape[0], continuations)
    _check_room(prefilled, forced.shape[1])
    return _forced_from(
        params, prefilled.logits, prefilled.cache, forced,
        cfg=cfg, cache_config=cache, prompt_len=prefilled.prompt_len,
    )  # fmt: skip
