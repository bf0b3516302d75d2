"""TailorKV's prompt stores: each row's prompt K/V in full precision, row-local, in host memory
when offloaded (``pinned_host``), and the host-side reads and writes on them.

Host memory inside jit: a gather cannot mix memory spaces, so reads and writes of the stores run
on the host (``compute_on("device_host")``) and only their results cross to the device.

A decode step's reads follow live work: they are made of units (one row's prompt block, one row's
top-k tokens), listed for the decoding rows only (:func:`unit_rows`) and read in transfers of a
fixed number of units and then of smaller powers of two (:func:`over_units`), so that no transfer
carries a unit of an idle row or a padding unit.
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.compute_on import compute_on

PROMPT_BLOCK = 512  # prompt tokens a sparse layer scores per loop step; prompt stores hold whole blocks


def prompt_capacity(tokens: int, residual: int) -> int:
    """Slots of a prompt store that holds ``tokens``: whole ``PROMPT_BLOCK``s and whole R-blocks
    of ``residual`` tokens (TailorKV's quantized layers are started R-block by R-block)."""
    unit = math.lcm(PROMPT_BLOCK, residual)
    return max(1, -(-tokens // unit)) * unit


def on_host(offload: bool, fn, *args, keepon_host: bool = False):
    """``fn(*args)`` beside host-resident stores: run on the host (``args`` moved there first), only
    the result crossing to the device (or staying on the host: a store's update). Without
    offload the stores are on the device and ``fn`` runs there."""
    if not offload:
        return fn(*args)
    args = jax.device_put(args, jax.memory.Space.Host)
    with compute_on("device_host"):
        out = fn(*args)
    return out if keepon_host else jax.device_put(out, jax.memory.Space.Device)


def to_host(x: jax.Array, offload: bool) -> jax.Array:
    return jax.device_put(x, jax.memory.Space.Host) if offload else x


def host_zeros(shape: tuple[int, ...], dtype, offload: bool, sharding: jax.sharding.Sharding | None = None) -> jax.Array:
    """A zero store allocated in host memory (never staged through the device), on ``sharding``
    (a host memory kind; default: this process's first device's host memory)."""
    if not offload:
        return jnp.zeros(shape, dtype)
    host = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0], memory_kind="pinned_host")
    return jax.device_put(np.zeros(shape, dtype), host)


def over_units(total: jax.Array, group: int, read, carry):
    """``carry`` through ``read(start, size, carry)`` over units 0..total-1 (``total`` int32, known
    at run time only): transfers of ``group`` units while that many are left, then one of each
    smaller power of two the remainder needs. Every unit is read once and no transfer is padded
    (shapes are static, so the sizes are too: a handful of variants of one read)."""
    full = total // group
    carry = jax.lax.fori_loop(0, full, lambda i, c: read(i * group, group, c), carry)
    start = full * group
    for size in reversed([1 << i for i in range((group - 1).bit_length())]):  # the powers of two below group
        take = total - start >= size
        carry = jax.lax.cond(take, functools.partial(read, start, size), lambda c: c, carry)
        start = start + jnp.where(take, size, 0)
    return carry


def unit_rows(units: jax.Array, counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Units int32 [n] of a list where row b holds counts[b] units (rows in order) -> (their row,
    their index within the row), int32 [n] each. Units must be below ``counts.sum()``."""
    ends = jnp.cumsum(counts)
    rows = jnp.minimum(jnp.searchsorted(ends, units, side="right"), counts.shape[0] - 1).astype(jnp.int32)
    return rows, units - (ends[rows] - counts[rows])


def tokens_at(x: jax.Array, rows: jax.Array, slots: jax.Array) -> jax.Array:
    """x [B, Hkv, S, hd] at rows int32 [n] and their slots int32 [n, T] -> [n, Hkv, T, hd]."""
    return x[rows[:, None], :, slots].swapaxes(1, 2)


def row_local(x: jax.Array, start: jax.Array, length: int) -> jax.Array:
    """Left-padded x [B, Hkv, S, hd] -> [B, Hkv, length, hd] with row b's tokens from slot 0
    (slots past the row's end repeat its last slot; they are never served)."""
    slots = jnp.clip(start[:, None] + jnp.arange(length)[None, :], 0, x.shape[2] - 1)
    return jnp.take_along_axis(x, slots[:, None, :, None], axis=2)


@flax.struct.dataclass
class PromptStore:
    """One layer's prompts in full precision, row-local: k, v [B, Hkv, P, hd]; a sparse layer's
    also as kt [B, Hkv, hd, P] (keys transposed: one channel of every token is one contiguous
    row, what the token estimate reads). In host memory when offloaded."""

    k: jax.Array
    v: jax.Array
    kt: jax.Array | None

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def filled(self, k: jax.Array, v: jax.Array, offload: bool) -> "PromptStore":
        """Whole stores from row-local k, v [B, Hkv, P, hd] (on the device)."""
        kt = None if self.kt is None else to_host(k.swapaxes(2, 3), offload)
        return PromptStore(to_host(k, offload), to_host(v, offload), kt)

    def write(self, k: jax.Array, v: jax.Array, rows: jax.Array, slots: jax.Array, offload: bool) -> "PromptStore":
        """k, v [R, T, Hkv, hd] written at (rows, slots) int32 [R, T]; a row index past the last
        row drops that token (padding)."""

        def put(store: jax.Array, new: jax.Array, rows: jax.Array, slots: jax.Array, transposed: bool) -> jax.Array:
            at = (rows, slice(None), slice(None), slots) if transposed else (rows, slice(None), slots)
            return store.at[at].set(new.astype(store.dtype), mode="drop")

        def write_all(stores, k, v, rows, slots):
            return tuple(put(store, new, rows, slots, i == 2) for i, (store, new) in enumerate(zip(stores, (k, v, k))))

        stores = (self.k, self.v) + (() if self.kt is None else (self.kt,))
        written = on_host(offload, write_all, stores, k, v, rows, slots, keepon_host=True)
        return PromptStore(*written[:2], written[2] if self.kt is not None else None)

    def read(self, first_row: jax.Array, rows: int, start: jax.Array, size: int, offload: bool) -> tuple[jax.Array, jax.Array]:
        """(k, v) [rows, Hkv, size, hd] of rows first_row.. from slot ``start``, on the device."""

        def cut(k, v, first_row, start):
            at = (first_row, 0, start, 0)
            return tuple(jax.lax.dynamic_slice(x, at, (rows, *x.shape[1:2], size, x.shape[3])) for x in (k, v))

        return on_host(offload, cut, self.k, self.v, first_row, jnp.asarray(start, jnp.int32))

    def read_rows(self, rows: jax.Array, start: jax.Array, size: int, offload: bool) -> tuple[jax.Array, jax.Array]:
        """(k, v) [n, Hkv, size, hd] of rows int32 [n] from slot ``start``, on the device."""
        return self.tokens(rows, jnp.broadcast_to(start + jnp.arange(size), (rows.shape[0], size)), offload)

    def tokens(self, rows: jax.Array, slots: jax.Array, offload: bool) -> tuple[jax.Array, jax.Array]:
        """(k, v) [n, Hkv, T, hd] of rows int32 [n] at their slots int32 [n, T], on the device."""
        return on_host(offload, lambda k, v, rows, slots: (tokens_at(k, rows, slots), tokens_at(v, rows, slots)),
                        self.k, self.v, rows, slots)  # fmt: skip

    def channel_blocks(self, channels: jax.Array, rows: jax.Array, blocks: jax.Array, offload: bool) -> jax.Array:
        """[n, Hkv, C, PROMPT_BLOCK]: channels int32 [n, Hkv, C] of prompt block blocks[i] of row
        rows[i] (int32 [n]), read from the transposed keys (a sparse layer's token estimate), on
        the device: one contiguous span per (unit, head, channel). The heads are mapped over, not
        indexed, here and in :meth:`gather`: a mesh that splits them reads each on its own device."""

        def read(kt, channels, rows, blocks):
            def span(head_kt, row, channel, block):  # head_kt [B, hd, P]: one head's transposed keys
                return jax.lax.dynamic_slice(head_kt, (row, channel, block * PROMPT_BLOCK), (1, 1, PROMPT_BLOCK))[0, 0]

            per_head = jax.vmap(jax.vmap(span, (None, None, 0, None)), (1, None, 0, None))
            return jax.vmap(per_head, (None, 0, 0, 0))(kt, rows, channels, blocks)

        return on_host(offload, read, self.kt, channels, rows, blocks)

    def gather(self, rows: jax.Array, chosen: jax.Array, offload: bool) -> tuple[jax.Array, jax.Array]:
        """(k, v) [n, Hkv, N, hd] of rows int32 [n] at their chosen tokens int32 [n, Hkv, N], on the
        device (indexed, so that no slice of a whole store is made)."""

        def pick(k, v, rows, chosen):
            per_head = jax.vmap(lambda head_k, head_chosen: head_k[rows[:, None], head_chosen], (1, 1), 1)  # [B, P, hd] -> [n, N, hd]
            return per_head(k, chosen), per_head(v, chosen)

        return on_host(offload, pick, self.k, self.v, rows, chosen)
