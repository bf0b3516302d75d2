"""KV caches: immutable pytrees behind one small interface (:class:`dami_jax.models.model.KVCache`,
defined beside the decoder that calls it).

Rows are left-padded to a common prompt length, so every row writes the same slot each step
(one ``dynamic_update_slice`` for the batch) and the last prompt token sits in the same column
for all rows. ``start[b]`` marks where row b's real tokens begin; RoPE positions count from it.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import flax.struct
import jax
import jax.numpy as jnp

from dami_jax.models.attention import attention
from dami_jax.models.config import ModelConfig
from dami_jax.models.model import KVCache


class CacheConfig(Protocol):
    """How :func:`dami_jax.generate` builds the cache it decodes with. Prefill always runs on a
    full-precision :class:`DenseKVCache` (as TailorKV prescribes); ``after_prefill`` turns that
    into the decode-time cache. Implementations are frozen dataclasses (static under jit)."""

    def after_prefill(self, cfg: ModelConfig, cache: "DenseKVCache", prompt_len: int) -> KVCache:
        """``cache`` holds the ``prompt_len`` prompt slots (left-padded); the rest is for decoding."""


@dataclasses.dataclass(frozen=True)
class DenseCacheConfig:
    """Decode on the preallocated full-precision cache itself."""

    def after_prefill(self, cfg: ModelConfig, cache: "DenseKVCache", prompt_len: int) -> "DenseKVCache":
        return cache


HOST_MEMORY_KINDS = ("pinned_host", "unpinned_host")


def cache_bytes(cache) -> tuple[int, int]:
    """(bytes on the device, bytes in host memory) of a cache's arrays: how much of it offloading
    (TailorKV's sparse layers) keeps off the accelerator."""
    leaves = jax.tree.leaves(cache)
    on_host = sum(x.nbytes for x in leaves if x.sharding.memory_kind in HOST_MEMORY_KINDS)
    return sum(x.nbytes for x in leaves) - on_host, on_host


def visible_mask(start: jax.Array, first_slot: jax.Array, num_queries: int, num_slots: int) -> jax.Array:
    """bool [B, T, S]: query t (at slot first_slot + t) sees slots start[b]..first_slot + t."""
    slots = jnp.arange(num_slots)
    query_slots = first_slot + jnp.arange(num_queries)
    causal = slots[None, :] <= query_slots[:, None]
    return causal[None] & (slots[None, None, :] >= start[:, None, None])


@flax.struct.dataclass
class DenseKVCache:
    """Preallocated full-precision cache: per layer k, v [B, Hkv, S, hd]."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    length: jax.Array  # int32 []: slots 0..length-1 are written
    start: jax.Array  # int32 [B]: first real (non-padding) slot of each row

    @classmethod
    def create(cls, cfg: ModelConfig, start: jax.Array, size: int, dtype=jnp.float32) -> "DenseKVCache":
        shape = (start.shape[0], cfg.num_kv_heads, size, cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return cls(k=zeros, v=zeros, length=jnp.zeros((), jnp.int32), start=start.astype(jnp.int32))

    @property
    def size(self) -> int:
        return self.k[0].shape[2]

    def positions(self, num_tokens: int) -> jax.Array:
        return self.length + jnp.arange(num_tokens)[None, :] - self.start[:, None]

    def wants_next_query(self, layer: int) -> bool:
        return False

    def attend(self, layer: int, q, k, v, next_query=None) -> tuple[jax.Array, "DenseKVCache"]:
        ks, vs = write_slots((self.k[layer], self.v[layer]), (k, v), self.length)
        out = attention(q, ks, vs, visible_mask(self.start, self.length, q.shape[1], self.size))
        return out, self.replace(k=replace_layer(self.k, layer, ks), v=replace_layer(self.v, layer, vs))

    def advance(self, num_tokens: int) -> "DenseKVCache":
        return self.replace(length=self.length + num_tokens)


def write_slots(caches: tuple[jax.Array, ...], new: tuple[jax.Array, ...], at: jax.Array) -> tuple[jax.Array, ...]:
    """Each cache [B, H, S, hd] with its ``new`` [B, T, H, hd] written at slots at..at+T-1 (in
    place when the caches are donated or loop-carried). ``at``: int32 [] for the whole batch, or
    int32 [B], one first slot per row (the engine's slots, each at its own length).

    On CPU the writes sit in a ``lax.cond`` on the block fitting (callers size their caches so
    that it always does): XLA:CPU fuses a bare dynamic_update_slice into the bitcast that feeds
    the attention matmul, which duplicates the update and makes it copy the whole cache, four
    times per layer and step. A conditional is not fusible, so the update stays in place.
    Other backends take the plain update.
    """
    new = tuple(n.swapaxes(1, 2).astype(c.dtype) for c, n in zip(caches, new))

    def put_one(cache, piece):
        if jnp.ndim(at) == 0:
            return jax.lax.dynamic_update_slice(cache, piece, (0, 0, at, 0))
        return jax.vmap(lambda row, rows_piece, row_at: jax.lax.dynamic_update_slice(row, rows_piece, (0, row_at, 0)))(cache, piece, at)

    def put(caches):
        return tuple(put_one(c, n) for c, n in zip(caches, new))

    def put_unfused(caches):
        fits = jnp.all(at + new[0].shape[2] <= caches[0].shape[2])
        return jax.lax.cond(fits, put, lambda caches: caches, caches)

    return jax.lax.platform_dependent(caches, cpu=put_unfused, default=put)


def replace_layer(items: tuple, index: int, value) -> tuple:
    """``items`` (one entry per layer) with entry ``index`` replaced: caches are immutable."""
    return items[:index] + (value,) + items[index + 1 :]
