"""The engine's KV cache: one row per slot, each row at its own length.

:class:`dami_jax.decoding.cache.DenseKVCache` left-pads a batch to one shared length, which suits
a batch that starts together. The engine's rows start whenever a slot frees up, so every row
keeps its own ``length``: its request's tokens sit in slots 0..length-1 (no padding in front),
RoPE positions count from 0, and a decode step writes each row at its own slot. A slot that is
handed to the next request needs no clearing: everything at or past the new ``length`` is masked.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from dami_jax.decoding.cache import replace_layer, write_slots
from dami_jax.models.attention import attention
from dami_jax.models.config import ModelConfig


@flax.struct.dataclass
class SlotKVCache:
    """Per layer k, v [B, Hkv, S, hd]; row b holds ``length[b]`` tokens."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    length: jax.Array  # int32 [B]

    @classmethod
    def create(cls, cfg: ModelConfig, rows: int, size: int, dtype=jnp.float32) -> "SlotKVCache":
        shape = (rows, cfg.num_kv_heads, size, cfg.head_dim)
        def zeros():  # a buffer of its own for every leaf: the cache is donated
            return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))

        return cls(k=zeros(), v=zeros(), length=jnp.zeros((rows,), jnp.int32))

    @property
    def size(self) -> int:
        return self.k[0].shape[2]

    def positions(self, num_tokens: int) -> jax.Array:
        return self.length[:, None] + jnp.arange(num_tokens)[None, :]

    def wants_next_query(self, layer: int) -> bool:
        return False

    def attend(self, layer: int, q, k, v, next_query=None) -> tuple[jax.Array, "SlotKVCache"]:
        # A row past its request (an idle slot) may have run to the end: clamped, its write stays
        # inside the row, where the next request's prefill overwrites it.
        at = jnp.minimum(self.length, self.size - q.shape[1])
        ks, vs = write_slots((self.k[layer], self.v[layer]), (k, v), at)
        query_slots = self.positions(q.shape[1])  # [B, T]: a row's positions are its slots
        mask = jnp.arange(self.size)[None, None, :] <= query_slots[:, :, None]
        out = attention(q, ks, vs, mask)
        return out, self.replace(k=replace_layer(self.k, layer, ks), v=replace_layer(self.v, layer, vs))

    def advance(self, num_tokens: int) -> "SlotKVCache":
        return self.replace(length=self.length + num_tokens)

    def rows(self, indices: jax.Array) -> "SlotKVCache":
        """Rows ``indices`` int32 [n] as a cache of n rows (for prefilling requests into their
        slots). An index past the last row reads the last row: a padding row, see :meth:`with_rows`."""
        take = lambda x: jnp.take(x, indices, axis=0, mode="clip")  # noqa: E731
        return SlotKVCache(k=tuple(map(take, self.k)), v=tuple(map(take, self.v)), length=take(self.length))

    def with_rows(self, indices: jax.Array, rows: "SlotKVCache") -> "SlotKVCache":
        """This cache with rows ``indices`` replaced by ``rows`` (their first ``rows.size``
        slots, when ``rows`` is shorter); an index past the last row (a padding row of the batch)
        is dropped."""
        put = lambda x, r: x.at[indices, :, : r.shape[2]].set(r, mode="drop")  # noqa: E731
        return SlotKVCache(k=tuple(map(put, self.k, rows.k)), v=tuple(map(put, self.v, rows.v)),
                           length=self.length.at[indices].set(rows.length, mode="drop"))  # fmt: skip
