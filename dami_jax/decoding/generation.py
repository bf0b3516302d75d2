"""Batched generation: one prefill, then a jitted ``lax.while_loop`` decode.

The loop state is an immutable pytree; nothing returns to Python between tokens.
"""

from __future__ import annotations

import dataclasses
import inspect
from functools import partial
from typing import Any, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dami_jax.decoding.cache import CacheConfig, DenseCacheConfig, DenseKVCache
from dami_jax.decoding.sampling import GREEDY, Sampling, sample_tokens, split_key
from dami_jax.models.config import ModelConfig
from dami_jax.models.model import KVCache, decoder, lm_logits
from dami_jax.models.params import Params

PROMPT_BUCKET = 32  # prompt lengths are padded up to a multiple of this, to bound recompiles
PREFILL_CHUNK = 1024  # longer prompts are prefilled in chunks of this many tokens (bounded memory)
NO_STOP = -1


@flax.struct.dataclass
class Generation:
    """What :func:`generate` returns. Rows stop independently; stop tokens are included."""

    tokens: jax.Array  # int32 [B, max_new_tokens]; pad_token_id after a row has stopped
    lengths: jax.Array  # int32 [B]: generated tokens per row, stop token included
    logprobs: jax.Array  # float32 [B, max_new_tokens]: model log-prob of each token; 0 after stop

    def token_lists(self) -> list[list[int]]:
        tokens, lengths = np.asarray(self.tokens), np.asarray(self.lengths)
        return [row[:n].tolist() for row, n in zip(tokens, lengths)]


@flax.struct.dataclass
class _Loop:
    step: jax.Array  # int32 []: tokens generated so far
    logits: jax.Array  # float32 [B, V]: next-token logits
    cache: Any
    key: jax.Array
    out: Generation
    done: jax.Array  # bool [B]


def _left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full((len(prompts), length), pad_id, dtype=np.int32)
    start = np.zeros(len(prompts), dtype=np.int32)
    for i, p in enumerate(prompts):
        tokens[i, length - len(p) :] = p
        start[i] = length - len(p)
    return tokens, start


def _stop_table(stop_tokens, batch: int, default: tuple[int, ...]) -> np.ndarray:
    """Shared ``[ids]`` or per-row ``[[ids], ...]`` -> int32 [B, K] padded with NO_STOP."""
    if stop_tokens is None:
        stop_tokens = default
    rows = list(stop_tokens)
    if not rows or not isinstance(rows[0], (list, tuple, np.ndarray)):
        rows = [rows] * batch
    if len(rows) != batch:
        raise ValueError(f"stop_tokens: got {len(rows)} rows for a batch of {batch}")
    width = max(1, max(len(r) for r in rows))
    table = np.full((batch, width), NO_STOP, dtype=np.int32)
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    return table


def prepare_prompts(
    prompts: Sequence[Sequence[int]], cfg: ModelConfig, max_new_tokens: int, cache_size: int | None = None
) -> tuple[jax.Array, jax.Array, int]:
    """Validate and left-pad prompts: (tokens int32 [B, P], start int32 [B], cache_size).

    P is the longest prompt rounded up to ``PROMPT_BUCKET`` (or ``PREFILL_CHUNK`` for long
    prompts), so that nearby lengths share one compilation.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: need at least one prompt, and every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    bad = [(i, t) for i, p in enumerate(prompts) for t in p if not 0 <= int(t) < cfg.vocab_size]
    if bad:
        raise ValueError(f"prompts: row {bad[0][0]} has token id {bad[0][1]} outside the vocabulary [0, {cfg.vocab_size})")
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"prompts: longest prompt ({longest} tokens) + max_new_tokens={max_new_tokens} exceeds the "
            f"model's max_position_embeddings={cfg.max_position_embeddings}"
        )
    bucket = PROMPT_BUCKET if longest <= PREFILL_CHUNK else PREFILL_CHUNK
    padded = -(-longest // bucket) * bucket
    if cache_size is None:
        cache_size = padded + max_new_tokens
    elif longest + max_new_tokens > cache_size:
        raise ValueError(
            f"cache_size={cache_size} is too small: the longest prompt has {longest} tokens and "
            f"max_new_tokens={max_new_tokens}"
        )
    if padded + max_new_tokens > cache_size:  # a caller-fixed cache: pad less (chunking needs the bucket)
        padded = longest if longest <= PREFILL_CHUNK else padded
        if padded + max_new_tokens > cache_size:
            raise ValueError(f"cache_size={cache_size}: prompts longer than {PREFILL_CHUNK} tokens are padded to "
                             f"{padded}, which with max_new_tokens={max_new_tokens} does not fit")  # fmt: skip
    tokens, start = _left_pad(prompts, padded, cfg.pad_token_id)
    return jnp.asarray(tokens), jnp.asarray(start), cache_size


def generate(
    params: Params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    sampling: Sampling = GREEDY,
    key: jax.Array | None = None,
    stop_tokens: Sequence[int] | Sequence[Sequence[int]] | None = None,
    cache_size: int | None = None,
    cache: CacheConfig = DenseCacheConfig(),
) -> Generation:
    """Generate up to ``max_new_tokens`` for each prompt (token-id lists of any lengths).

    ``stop_tokens`` defaults to the checkpoint's EOS ids; pass per-row lists to stop rows on
    different tokens, or ``[]`` to never stop early. ``key`` is required when sampling: one key
    for the batch, or one per prompt (shape [B]) so that each row's tokens depend only on its own
    key and not on which other prompts share the batch.
    ``cache_size`` bounds prompt + generated tokens (default: just enough). ``cache`` chooses the
    decode-time cache (e.g. ``TailorKVConfig``); prompts longer than ``PREFILL_CHUNK`` are
    prefilled chunk by chunk.
    """
    inputs = _inputs(cfg, prompts, max_new_tokens, sampling, key, stop_tokens, cache_size, cache)
    return _generate(params, *inputs.arrays, cfg=cfg, **inputs.static)


def stream_tokens(params: Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], **options: Any) -> Iterator[np.ndarray]:
    """:func:`generate` one token at a time, for interactive use: yields int32 [B] per step, each
    row's new token or ``-1`` once the row has stopped. ``options`` are :func:`generate`'s keywords
    (bound against its signature: the same names, defaults and checks). Same tokens as
    :func:`generate` with the same key, but control returns to Python between tokens."""
    bound = inspect.signature(generate).bind(params, cfg, prompts, **options)
    bound.apply_defaults()
    inputs = _inputs(**{name: value for name, value in bound.arguments.items() if name != "params"})
    loop = _start_jit(params, *inputs.arrays, cfg=cfg, **inputs.static)
    for step in range(1, inputs.max_new_tokens + 1):
        if step > 1:
            loop = _advance_jit(params, loop, inputs.stop, cfg=cfg, sampling=inputs.sampling)
        lengths, column, done = jax.device_get((loop.out.lengths, loop.out.tokens[:, step - 1], loop.done))
        yield np.where(lengths >= step, column, -1).astype(np.int32)  # -1: the row stopped before this step
        if done.all():
            return


def stream_text(params: Params, cfg: ModelConfig, tokenizer, prompt: Sequence[int], **kwargs: Any) -> Iterator[str]:
    """Stream one prompt's answer as text pieces (``for piece in stream_text(...): print(piece,
    end="")``). Special tokens are skipped; a piece is held back while it ends inside a multi-byte
    character. ``kwargs`` go to :func:`stream_tokens`."""
    ids: list[int] = []
    shown = ""
    for (token,) in stream_tokens(params, cfg, [prompt], **kwargs):
        if token < 0:
            break
        ids.append(int(token))
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if len(text) > len(shown) and not text.endswith("\ufffd"):
            yield text[len(shown) :]
            shown = text


@dataclasses.dataclass(frozen=True)
class _Inputs:
    tokens: jax.Array  # int32 [B, P], left-padded
    start: jax.Array  # int32 [B]: first real token per row
    stop: jax.Array  # int32 [B, K]: stop ids per row, NO_STOP-padded
    key: jax.Array
    cache_size: int
    max_new_tokens: int
    sampling: Sampling
    cache: CacheConfig

    @property
    def arrays(self) -> tuple[jax.Array, ...]:
        return self.tokens, self.start, self.stop, self.key

    @property
    def static(self) -> dict[str, Any]:
        """The jitted start's static keywords."""
        return {"sampling": self.sampling, "max_new_tokens": self.max_new_tokens, "cache_size": self.cache_size,
                "cache_config": self.cache}  # fmt: skip


def _inputs(cfg, prompts, max_new_tokens, sampling, key, stop_tokens, cache_size, cache) -> _Inputs:
    """Validated, padded inputs shared by :func:`generate` and :func:`stream_tokens`."""
    tokens, start, cache_size = prepare_prompts(prompts, cfg, max_new_tokens, cache_size)
    if sampling.greedy:
        key = jax.random.key(0) if key is None else key
    elif key is None:
        raise ValueError("key: sampling with temperature > 0 needs an explicit PRNG key (jax.random.key(seed))")
    if key.ndim not in (0, 1) or (key.ndim == 1 and key.shape[0] != len(prompts)):
        raise ValueError(f"key: need one PRNG key or one per prompt ({len(prompts)}), got shape {key.shape}")
    stop = _stop_table(stop_tokens, len(prompts), cfg.eos_token_ids)
    return _Inputs(tokens, start, jnp.asarray(stop), key, cache_size, max_new_tokens, sampling, cache)


def _record(loop: _Loop, stop: jax.Array, sampling: Sampling, pad_id: int) -> _Loop:
    """Pick the next token from ``loop.logits`` and write it at column ``loop.step``."""
    key, sub = split_key(loop.key)
    token = sample_tokens(loop.logits, sub, sampling)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(loop.logits), token[:, None], axis=-1)[:, 0]
    token = jnp.where(loop.done, pad_id, token)
    out = loop.out.replace(
        tokens=loop.out.tokens.at[:, loop.step].set(token),
        logprobs=loop.out.logprobs.at[:, loop.step].set(jnp.where(loop.done, 0.0, logprob)),
        lengths=loop.out.lengths + (~loop.done).astype(jnp.int32),
    )
    done = loop.done | jnp.any(token[:, None] == stop, axis=-1)
    return loop.replace(step=loop.step + 1, key=key, out=out, done=done)


def prefill(params: Params, cfg: ModelConfig, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Run the prompt through the cache, in ``PREFILL_CHUNK`` pieces when longer (a ``lax.scan``,
    so one compiled chunk serves any length). Returns (hidden of the last position [B, D], cache)."""
    batch, length = tokens.shape
    if length <= PREFILL_CHUNK:
        hidden, cache = decoder(params, cfg, tokens, cache)
        return hidden[:, -1], cache

    def chunk_step(cache, chunk):
        hidden, cache = decoder(params, cfg, chunk, cache)
        return cache, hidden[:, -1]

    chunks = tokens.reshape(batch, length // PREFILL_CHUNK, PREFILL_CHUNK).swapaxes(0, 1)
    cache, last = jax.lax.scan(chunk_step, cache, chunks)
    return last[-1], cache


def start_decoding(params, cfg: ModelConfig, tokens, start, cache_size: int, cache_config: CacheConfig) -> tuple[jax.Array, KVCache]:
    """Prefill on a dense cache, then convert it: (next-token logits float32 [B, V], decode cache)."""
    dense = DenseKVCache.create(cfg, start, cache_size, params["embed"].dtype)
    last_hidden, dense = prefill(params, cfg, tokens, dense)
    return lm_logits(params, last_hidden), cache_config.after_prefill(cfg, dense, tokens.shape[1])


def decode_step(params, cfg: ModelConfig, token: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Feed one token per row, int32 [B] -> (next-token logits float32 [B, V], cache)."""
    hidden, cache = decoder(params, cfg, token[:, None], cache)
    return lm_logits(params, hidden[:, 0]), cache


@partial(jax.jit, static_argnames=("cfg", "cache_size", "cache_config"))
def build_cache(params, tokens, start, *, cfg: ModelConfig, cache_size: int, cache_config: CacheConfig = DenseCacheConfig()):
    """:func:`start_decoding` jitted on its own (from :func:`prepare_prompts`' output): to inspect
    a cache (bytes, memory kinds) or to time :func:`decode_step` in benchmarks."""
    return start_decoding(params, cfg, tokens, start, cache_size, cache_config)


def _start(params, tokens, start, stop, key, *, cfg: ModelConfig, sampling, max_new_tokens, cache_size, cache_config) -> _Loop:
    """Prefill and pick the first token: the loop state before the first decode step."""
    batch = tokens.shape[0]
    logits, cache = start_decoding(params, cfg, tokens, start, cache_size, cache_config)
    out = Generation(
        tokens=jnp.full((batch, max_new_tokens), cfg.pad_token_id, jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32),
        logprobs=jnp.zeros((batch, max_new_tokens), jnp.float32),
    )
    loop = _Loop(
        step=jnp.zeros((), jnp.int32), logits=logits, cache=cache, key=key,
        out=out, done=jnp.zeros((batch,), bool),
    )  # fmt: skip
    return _record(loop, stop, sampling, cfg.pad_token_id)


def _advance(params, loop: _Loop, stop, *, cfg: ModelConfig, sampling) -> _Loop:
    """One decode step: feed the last token, pick the next."""
    logits, cache = decode_step(params, cfg, loop.out.tokens[:, loop.step - 1], loop.cache)
    return _record(loop.replace(logits=logits, cache=cache), stop, sampling, cfg.pad_token_id)


def _unfinished(loop: _Loop) -> jax.Array:
    return (loop.step < loop.out.tokens.shape[1]) & ~jnp.all(loop.done)


@partial(jax.jit, static_argnames=("cfg", "sampling", "max_new_tokens", "cache_size", "cache_config"))
def _generate(params, tokens, start, stop, key, *, cfg: ModelConfig, sampling, max_new_tokens, cache_size, cache_config) -> Generation:
    loop = _start(params, tokens, start, stop, key, cfg=cfg, sampling=sampling, max_new_tokens=max_new_tokens,
                  cache_size=cache_size, cache_config=cache_config)  # fmt: skip
    return jax.lax.while_loop(_unfinished, lambda loop: _advance(params, loop, stop, cfg=cfg, sampling=sampling), loop).out


# Streaming runs the same two pieces as separate jitted calls; the loop state is donated, so a
# step updates the cache in place rather than copying it.
_start_jit = jax.jit(_start, static_argnames=("cfg", "sampling", "max_new_tokens", "cache_size", "cache_config"))
_advance_jit = jax.jit(_advance, static_argnames=("cfg", "sampling"), donate_argnames=("loop",))
