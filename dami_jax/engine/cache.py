"""The engine's per-slot cache backends: the protocol (:class:`SlotCache`), the views that prompt
pieces and decode steps run through, and the dense backend (:class:`SlotKVCache`).

Row s holds the request in slot s: its tokens at slots 0..length[s]-1 (no padding in front), so
RoPE positions are slots. Handing a slot to the next request clears nothing (everything past the
new length is invisible: attention is causal by slot), so freeing a row costs nothing.

The engine reaches a backend through views, each a :class:`dami_jax.models.model.KVCache` that
the decoder runs on:
- :class:`PackedView` inserts rows: the first pieces of several prompts packed into one
  sequence, each token written into its own row (attention stays inside each prompt; nothing is
  read from the cache);
- :class:`RowsView` (``continuing``): a later piece of one row's prompt, after its first
  ``offset`` tokens; and, for the dense backend, ``decoding``: one new token for each of rows
  0..R-1.
Both views call the backend's ``write`` (only real new tokens: padding is dropped) and
``row_attention``. The dense backend reads through
:func:`~dami_jax.models.attention.live_attention` (the first ``window`` slots, then only the
blocks that the longest live row reaches) or, for decode steps on a GPU, the Pallas kernel that
loads each row's live blocks only. So a step costs what its rows hold, not what the engine was
sized for. The TailorKV backend (:mod:`~dami_jax.engine.tailorkv_slots`) shares the prefill views
and decodes through its own rows.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import flax.struct
import jax
import jax.numpy as jnp

from dami_jax.decoding.cache import replace_layer
from dami_jax.models.attention import attention, live_attention
from dami_jax.models.config import ModelConfig
from dami_jax.models.model import KVCache
from dami_kernels.blocks import head_dim_fits
from dami_kernels.decode_attention import decode_attention

KERNELS = ("auto", "xla", "pallas")


def resolve_kernel(kernel: str, cfg: ModelConfig, backend: str | None = None) -> str:
    """What computes a decode step's attention: ``"xla"`` (:func:`live_attention`) or ``"pallas"``
    (:func:`dami_kernels.decode_attention.decode_attention`, per-row lengths: it loads no block
    past a row's length; interpreted on CPU, for checking). ``"auto"``: Pallas on a GPU where
    the kernel takes the head size, XLA elsewhere. Prompt pieces always take the XLA path."""
    backend = backend or jax.default_backend()
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "auto":
        return "pallas" if backend == "gpu" and head_dim_fits(cfg.head_dim) else "xla"
    if kernel == "pallas" and not head_dim_fits(cfg.head_dim):
        raise ValueError(f"kernel='pallas' takes head_dim a power of two >= 16, got {cfg.head_dim}")
    return kernel

@dataclasses.dataclass(frozen=True)
class RowLayout:
    """How a row is read (:func:`live_attention`): its first ``window`` slots as one static slice,
    the rest in blocks of ``block`` that only the longest live row's reach brings in. The defaults
    were chosen by measurement (scripts/bench_engine.py, docs/results.md): short rows pay one
    static read and no loop; long rows pay a few loop iterations per layer on top of the reads
    they need anyway."""

    window: int = 512
    block: int = 512

    def __post_init__(self):
        if self.window < 1 or self.block < 1:
            raise ValueError(f"RowLayout: window and block must be >= 1, got {self.window} and {self.block}")

    def capacity(self, max_len: int) -> int:
        """Slots a row needs to hold ``max_len`` tokens: the window, then whole blocks."""
        if max_len <= self.window:
            return max_len
        return self.window + -(-(max_len - self.window) // self.block) * self.block

    def longest_within(self, capacity: int) -> int:
        """The largest ``max_len`` whose row fits in ``capacity`` slots."""
        if capacity <= self.window:
            return capacity
        return self.window + (capacity - self.window) // self.block * self.block


class SlotCache(Protocol):
    """What the engine needs from a per-slot cache backend (:class:`SlotKVCache` is the dense one;
    :class:`~dami_jax.engine.tailorkv_slots.SlotTailorKVCache` the TailorKV one). Every method
    returns a new cache or a view (a :class:`~dami_jax.models.model.KVCache` the decoder runs on,
    whose ``cache`` field is the updated backend after the run). Prompt pieces reach a backend
    through the shared views (:class:`PackedView`, :class:`RowsView`), which call its ``write``,
    ``row_attention`` and ``with_length``."""

    length: jax.Array  # int32 [slots]: tokens held per row

    def packing(self, slot: jax.Array, position: jax.Array, segment: jax.Array) -> KVCache:
        """Insert rows: packed first pieces, token p into row slot[p] at position[p] (padding: slot
        past the last row); token p attends to the earlier tokens of its own segment."""

    def continuing(self, row: jax.Array, offset: jax.Array, real: jax.Array, width: int) -> KVCache:
        """A piece of ``width`` tokens (``real`` of them real) of one row, after ``offset`` tokens."""

    def started(self, rows: jax.Array) -> "SlotCache":
        """Rows int32 [n] whose prompts are now complete (a row past the last: none) get what
        decoding them needs."""

    def narrow(self, rows: int) -> "SlotCache":
        """The cache a decode call of rows 0..rows-1 runs on; :meth:`widen` puts it back."""

    def widen(self, narrowed: "SlotCache") -> "SlotCache":
        """This cache after a decode call that ran on ``narrowed``."""

    def decoding(self, rows: int, active: jax.Array) -> KVCache:
        """One token for each of rows 0..rows-1 (of a narrowed cache); rows where ``active``
        [rows] is False neither advance nor count as live (their outputs are meaningless)."""


def continuing_view(cache, row: jax.Array, offset: jax.Array, real: jax.Array, width: int) -> "RowsView":
    """A later prompt piece of one row, for any backend: queries at slots offset.., padding
    queries on the last real slot (their tokens are not written)."""
    steps = jnp.arange(width)
    slots = offset + jnp.minimum(steps, real - 1)
    return RowsView(cache, jnp.asarray(row, jnp.int32), slots[None], (steps < real)[None])


@flax.struct.dataclass
class SlotKVCache:
    """Per layer k, v [slots, Hkv, capacity, hd]; row s holds ``length[s]`` tokens."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    length: jax.Array  # int32 [slots]
    window: int = flax.struct.field(pytree_node=False)
    block: int = flax.struct.field(pytree_node=False)
    kernel: str = flax.struct.field(pytree_node=False, default="xla")  # a decode step's attention (resolve_kernel)

    @classmethod
    def create(cls, cfg: ModelConfig, slots: int, max_len: int, dtype=jnp.float32, layout: RowLayout = RowLayout(),
               kernel: str = "xla") -> "SlotKVCache":  # fmt: skip
        capacity = layout.capacity(max_len)
        shape = (slots, cfg.num_kv_heads, capacity, cfg.head_dim)

        def zeros():  # a buffer of its own for every leaf: the cache is donated
            return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))

        return cls(k=zeros(), v=zeros(), length=jnp.zeros((slots,), jnp.int32), window=min(capacity, layout.window),
                   block=layout.block, kernel=resolve_kernel(kernel, cfg))  # fmt: skip

    @property
    def slots(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def write(self, layer: int, k: jax.Array, v: jax.Array, rows: jax.Array, slots: jax.Array) -> "SlotKVCache":
        """k, v [R, T, Hkv, hd] written at (rows, slots) int32 [R, T]; a row index past the last
        row drops that token (padding). In place when the cache is donated or loop-carried."""

        def put(cache: jax.Array, new: jax.Array) -> jax.Array:
            return cache.at[rows, :, slots].set(new.astype(cache.dtype), mode="drop")

        return self.replace(k=replace_layer(self.k, layer, put(self.k[layer], k)),
                            v=replace_layer(self.v, layer, put(self.v[layer], v)))  # fmt: skip

    def with_length(self, length: jax.Array) -> "SlotKVCache":
        return self.replace(length=length)

    def row_attention(self, layer: int, q: jax.Array, first_row: jax.Array, query_slots: jax.Array, written: jax.Array,
                      decoding: bool) -> jax.Array:  # fmt: skip
        """Rows first_row..'s queries q [R, T, Hq, hd] (at query_slots [R, T]) over their rows' live
        slots; a decode step on the Pallas kernel where chosen (an idle row reads nothing)."""
        if decoding and self.kernel == "pallas":
            lengths = jnp.where(written, query_slots + 1, 0)[:, 0]
            return decode_attention(q, self.k[layer], self.v[layer], lengths, interpret=jax.default_backend() == "cpu")
        return live_attention(q, self.k[layer], self.v[layer], first_row, query_slots, window=self.window, block=self.block)

    def packing(self, slot: jax.Array, position: jax.Array, segment: jax.Array) -> "PackedView":
        return PackedView(self, slot, position, segment)

    def continuing(self, row: jax.Array, offset: jax.Array, real: jax.Array, width: int) -> "RowsView":
        return continuing_view(self, row, offset, real, width)

    def started(self, rows: jax.Array) -> "SlotKVCache":
        return self  # a dense row decodes from the slots its prompt was written to

    def narrow(self, rows: int) -> "SlotKVCache":
        return self  # decode steps read rows 0..rows-1 in place (RowsView)

    def widen(self, narrowed: "SlotKVCache") -> "SlotKVCache":
        return narrowed

    def decoding(self, rows: int, active: jax.Array) -> "RowsView":
        # An idle row queries slot 0 only, so that its stale length never widens the read.
        slots = jnp.where(active, self.length[:rows], 0)[:, None]
        return RowsView(self, jnp.zeros((), jnp.int32), slots, active[:, None], decoding=True)


@flax.struct.dataclass
class RowsView:
    """Rows first_row..first_row+R-1 of a backend, T new tokens each."""

    cache: SlotCache
    first_row: jax.Array  # int32 []
    slots: jax.Array  # int32 [R, T]: each new token's slot in its row (its RoPE position)
    written: jax.Array  # bool [R, T]: the token is real (written, counted in the row's length)
    decoding: bool = flax.struct.field(pytree_node=False, default=False)  # rows 0..R-1, one token each

    def positions(self, num_tokens: int) -> jax.Array:
        return self.slots

    def wants_next_query(self, layer: int) -> bool:
        return False

    def attend(self, layer: int, q, k, v, next_query=None) -> tuple[jax.Array, "RowsView"]:
        rows = self.first_row + jnp.arange(self.slots.shape[0])[:, None]
        cache = self.cache.write(layer, k, v, jnp.where(self.written, rows, self.cache.slots), self.slots)
        out = cache.row_attention(layer, q, self.first_row, self.slots, self.written, self.decoding)
        return out, self.replace(cache=cache)

    def advance(self, num_tokens: int) -> "RowsView":
        rows = self.first_row + jnp.arange(self.slots.shape[0])
        grown = jnp.max(jnp.where(self.written, self.slots + 1, 0), axis=1)
        return self.replace(cache=self.cache.with_length(self.cache.length.at[rows].max(grown)))


@flax.struct.dataclass
class PackedView:
    """First prompt pieces packed into one sequence of P tokens, each going into its own row."""

    cache: SlotCache
    slot: jax.Array  # int32 [P]: the token's row; past the last row for padding (dropped)
    position: jax.Array  # int32 [P]: its slot in that row (its RoPE position)
    segment: jax.Array  # int32 [P]: which prompt of the pack it belongs to

    def positions(self, num_tokens: int) -> jax.Array:
        return self.position[None]

    def wants_next_query(self, layer: int) -> bool:
        return False

    def attend(self, layer: int, q, k, v, next_query=None) -> tuple[jax.Array, "PackedView"]:
        cache = self.cache.write(layer, k, v, self.slot[None], self.position[None])
        order = jnp.arange(self.segment.shape[0])
        mask = (self.segment[:, None] == self.segment[None, :]) & (order[None, :] <= order[:, None])
        return attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask[None]), self.replace(cache=cache)

    def advance(self, num_tokens: int) -> "PackedView":
        # A new row's length is its piece's: reset, then the largest position + 1 (duplicate-safe).
        length = self.cache.length.at[self.slot].set(0, mode="drop").at[self.slot].max(self.position + 1, mode="drop")
        return self.replace(cache=self.cache.with_length(length))
