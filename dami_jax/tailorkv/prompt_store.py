"""TailorKV's prompt stores: each row's prompt K/V in full precision, row-local, in host memory
when offloaded (``pinned_host``), and the host-side reads and writes on them.

Host memory inside jit: a gather cannot mix memory spaces, so reads and writes of the stores run
on the host (``compute_on("device_host")``) and only their results cross to the device.
"""

from __future__ import annotations

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


def host_zeros(shape: tuple[int, ...], dtype, offload: bool) -> jax.Array:
    """A zero store allocated in host memory (never staged through the device)."""
    if not offload:
        return jnp.zeros(shape, dtype)
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    return jax.device_put(np.zeros(shape, dtype), host)


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

    def channel_rows(self, channels: jax.Array, start: jax.Array, size: int, offload: bool) -> jax.Array:
        """[B, Hkv, C, size]: channels int32 [B, Hkv, C] of tokens start.. of rows 0..B-1, read
        from the transposed keys (a sparse layer's token estimate), on the device."""
        rows, heads = channels.shape[:2]

        def read(kt, channels, start):
            block = jax.lax.dynamic_slice(kt, (0, 0, 0, start), (rows, heads, kt.shape[2], size))
            return jnp.take_along_axis(block, channels[..., None], axis=2, mode="promise_in_bounds")

        return on_host(offload, read, self.kt, channels, start)

    def gather(self, chosen: jax.Array, offload: bool) -> tuple[jax.Array, jax.Array]:
        """(k, v) [B, Hkv, N, hd] of rows 0..B-1 at their chosen tokens int32 [B, Hkv, N], on the
        device (indexed, so that no slice of a whole store is made)."""
        rows, heads = (jnp.broadcast_to(index, chosen.shape) for index in (
            jnp.arange(chosen.shape[0])[:, None, None], jnp.arange(chosen.shape[1])[None, :, None]))  # fmt: skip
        return on_host(offload, lambda k, v, rows, heads, chosen: (k[rows, heads, chosen], v[rows, heads, chosen]),
                       self.k, self.v, rows, heads, chosen)  # fmt: skip
