"""A weight mixed per batch row: row b of the batch runs on (1 - lam[b]) * first + lam[b] * second.

Mixing the *outputs* of each weight's op instead of the weights lets one batch decode every row
at its own lambda without materializing any mixed model: a matmul becomes
(1 - l) * (x @ W_first) + l * (x @ W_second). The model consumes every parameter through
:func:`per_row`, so a tree of :class:`RowMix` leaves runs through the ordinary decoder and
generation loop (it is a pytree, so it crosses ``jit`` like plain params).
"""

from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from dami_jax.models.params import Params


@flax.struct.dataclass
class RowMix:
    """Two same-shaped weights and a per-row weight on the second: lam float32 [B]."""

    first: jax.Array
    second: jax.Array
    lam: jax.Array

    @property
    def dtype(self) -> jnp.dtype:
        return self.first.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.first.shape


def per_row(weight: jax.Array | RowMix, fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """``fn(weight)`` for a plain array. For a :class:`RowMix`, (1 - l) * fn(first) + l * fn(second)
    with l = lam broadcast over fn's output, whose first axis must be the batch row [B, ...].
    (1 - l) * a + l * b rather than a + l * (b - a): lam = 0 and 1 give the endpoints exactly."""
    if not isinstance(weight, RowMix):
        return fn(weight)
    a, b = fn(weight.first), fn(weight.second)
    lam = weight.lam.astype(a.dtype).reshape(weight.lam.shape + (1,) * (a.ndim - 1))
    return (1 - lam) * a + lam * b


def mix_rows(first: Params, second: Params, lam: jax.Array) -> Params:
    """Two parameter trees of one shape -> one tree of :class:`RowMix` leaves; lam float32 [B]
    (one lambda per batch row). Nothing is computed or copied: the leaves are the inputs'."""
    lam = jnp.asarray(lam, jnp.float32)
    return jax.tree.map(lambda a, b: RowMix(a, b, lam), first, second)
