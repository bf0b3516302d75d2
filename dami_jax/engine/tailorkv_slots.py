"""The engine's TailorKV backend: every slot is one row of a
:class:`~dami_jax.tailorkv.cache.TailorKVCache`, at its own length, so long prompts and long
answers are served with 1/2-bit device KV in the quantized layers and host-resident prompts in the
sparse ones.

- Prefill (the shared :class:`~dami_jax.engine.cache.PackedView` / :class:`RowsView`): each
  prompt piece is written to its row's prompt stores (host memory when offloaded) in full
  precision, and a later piece attends to the earlier ones read back from there, block by block
  as far as it reaches: prefill is full precision, as TailorKV prescribes.
- The prefill call that completes a row's prompt starts the row (:meth:`started`): its quantized
  layers' codes and ring, its sparse layers' key ranges and windows, built from that row's prompt
  only. Nothing else moves.
- A decode call of rows 0..R-1 runs on those rows' device part (:meth:`narrow`, put back by
  :meth:`widen`); each sparse layer scores and fetches top-k tokens for the decoding rows only,
  each as far as its own prompt reaches. A free or prefilling row, inside the call or past it,
  moves nothing between host and device.
- Freeing a row costs nothing: the next request's start rewrites everything a decode reads.
"""

from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from dami_jax.engine.cache import PackedView, RowsView, continuing_view
from dami_jax.models.config import ModelConfig
from dami_jax.tailorkv.cache import TailorKVCache, TailorKVConfig
from dami_jax.tailorkv.prompt_store import host_zeros


def tailorkv_slot_bytes(cfg: ModelConfig, config: TailorKVConfig, max_new_tokens: int | None, dtype) -> Callable[[int], tuple[int, int]]:
    """max_len -> (device bytes, host bytes) of one TailorKV slot holding ``max_len`` tokens, at most
    ``max_new_tokens`` (default: all but one) of them generated: counted from the arrays
    :meth:`SlotTailorKVCache.create` would allocate (the prompt stores are the host part when
    offloaded)."""

    def slot_bytes(max_len: int) -> tuple[int, int]:
        generated = max(1, min(max_new_tokens or max_len, max_len - 1))
        shapes = jax.eval_shape(lambda: TailorKVCache.create(cfg, config, 1, max(1, max_len), generated, dtype, max_len=max(1, max_len),
                                                             zeros=jnp.zeros))  # fmt: skip
        prompts = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes.prompts))
        device = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)) - prompts
        return (device, prompts) if config.offload else (device + prompts, 0)

    return slot_bytes


@flax.struct.dataclass
class SlotTailorKVCache:
    """``inner``: the TailorKV rows (device part narrowed during a decode call)."""

    inner: TailorKVCache

    @classmethod
    def create(cls, cfg: ModelConfig, config: TailorKVConfig, slots: int, max_len: int, max_generated: int, dtype,
               store_sharding: jax.sharding.Sharding | None = None) -> "SlotTailorKVCache":  # fmt: skip
        """``slots`` rows of ``max_len`` tokens (prompt + generated), at most ``max_generated``
        of them generated (the sparse layers keep those on the device); the prompt stores
        allocated on ``store_sharding`` when offloaded (a mesh's: :func:`~dami_jax.engine.placement.store_sharding`)."""
        split = store_sharding is not None and not store_sharding.is_fully_replicated
        inner = TailorKVCache.create(cfg, config, slots, max_len, max_generated, dtype, max_len=max_len,
                                     head_mesh=store_sharding.mesh if split else None,
                                     zeros=lambda shape, dtype: host_zeros(shape, dtype, config.offload, store_sharding))  # fmt: skip
        return cls(inner.replace(active=jnp.zeros((slots,), bool)))

    @property
    def slots(self) -> int:
        return self.inner.prompts[0].k.shape[0]

    @property
    def length(self) -> jax.Array:
        return self.inner.length

    def with_length(self, length: jax.Array) -> "SlotTailorKVCache":
        return self.replace(inner=self.inner.replace(length=length))

    # ------------------------------------------------------------------ prefill

    def write(self, layer: int, k: jax.Array, v: jax.Array, rows: jax.Array, slots: jax.Array) -> "SlotTailorKVCache":
        return self.replace(inner=self.inner.write_prompt(layer, k, v, rows, slots))

    def row_attention(self, layer: int, q: jax.Array, first_row: jax.Array, query_slots: jax.Array, written: jax.Array,
                      decoding: bool) -> jax.Array:  # fmt: skip
        return self.inner.prompt_attention(layer, q, first_row, query_slots)

    def packing(self, slot: jax.Array, position: jax.Array, segment: jax.Array) -> PackedView:
        return PackedView(self, slot, position, segment)

    def continuing(self, row: jax.Array, offset: jax.Array, real: jax.Array, width: int) -> RowsView:
        return continuing_view(self, row, offset, real, width)

    def started(self, rows: jax.Array) -> "SlotTailorKVCache":
        return self.replace(inner=self.inner.start_rows(rows))

    # ------------------------------------------------------------------ decode

    def narrow(self, rows: int) -> "SlotTailorKVCache":
        return self.replace(inner=self.inner.narrow(rows))

    def widen(self, narrowed: "SlotTailorKVCache") -> "SlotTailorKVCache":
        return self.replace(inner=self.inner.widen(narrowed.inner))

    def decoding(self, rows: int, active: jax.Array) -> "TailorKVDecoding":
        return TailorKVDecoding(self.replace(inner=self.inner.replace(active=active)))


@flax.struct.dataclass
class TailorKVDecoding:
    """A decode step's view: the TailorKV rows' own decode step (:class:`TailorKVCache` is a
    :class:`~dami_jax.models.model.KVCache`), re-wrapped so that ``cache`` is the backend."""

    cache: SlotTailorKVCache

    def positions(self, num_tokens: int) -> jax.Array:
        return self.cache.inner.positions(num_tokens)

    def wants_next_query(self, layer: int) -> bool:
        return self.cache.inner.wants_next_query(layer)

    def attend(self, layer: int, q, k, v, next_query=None) -> tuple[jax.Array, "TailorKVDecoding"]:
        out, inner = self.cache.inner.attend(layer, q, k, v, next_query)
        return out, self.replace(cache=self.cache.replace(inner=inner))

    def advance(self, num_tokens: int) -> "TailorKVDecoding":
        return self.replace(cache=self.cache.replace(inner=self.cache.inner.advance(num_tokens)))
