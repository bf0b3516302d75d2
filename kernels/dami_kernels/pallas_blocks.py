"""Pallas plumbing shared by the Pallas kernels: the Triton lowering, masked block loads, and
the partials' output specs (see :mod:`dami_kernels.blocks` for the algorithm).

The kernels target Pallas' Triton lowering on GPU (``compiler_params`` selects it: recent JAX
lowers plain ``pallas_call`` to Mosaic GPU by default) and run anywhere with ``interpret=True``.
Triton's rules shape them: every loaded tensor has a power-of-two size, dots are 2-D, and a
block that overruns its array is not bounds-checked, so the last block of a length that is not
a multiple of the block is loaded with a mask (zeros past the end) and stored with one.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from dami_kernels.blocks import Partials, partial_shapes

COMPILER_PARAMS = pltriton.CompilerParams(num_warps=4, num_stages=2)


def program_rows(length: int, block: int) -> jax.Array:
    """bool [block]: which rows of this program's block (grid axis 2) exist in an axis of
    ``length`` rows split into blocks of ``block``."""
    return pl.program_id(2) * block + jax.lax.broadcasted_iota(jnp.int32, (block,), 0) < length


def load_rows(ref, exists: jax.Array) -> jax.Array:
    """The block ``ref`` [n, ...] with rows where ``exists`` [n] is False read as zeros."""
    mask = exists if ref.ndim == 1 else jnp.broadcast_to(exists[:, None], ref.shape)
    return pltriton.load(ref, mask=mask, other=0)


def store_rows(ref, value: jax.Array, exists: jax.Array) -> None:
    """Write ``value`` [n] into the block ``ref`` [n] where ``exists`` holds."""
    pltriton.store(ref, value, mask=exists)


def store_partials(m_ref, l_ref, o_ref, partials: Partials) -> None:
    m_ref[...], l_ref[...], o_ref[...] = partials


def query_spec(rows: jax.Array) -> pl.BlockSpec:
    """Program (b, h, i) reads KV head h's query rows [rows, hd] of ``rows`` [B, Hkv, rows, hd]."""
    return pl.BlockSpec((None, None, *rows.shape[2:]), lambda b, h, i: (b, h, 0, 0))


def mask_spec(mask: jax.Array, block: int) -> pl.BlockSpec:
    """Program (b, h, i) reads block i of row h (per-head mask) or row 0 of int32 [B, 1 or Hkv, S]."""
    if mask.shape[1] == 1:
        return pl.BlockSpec((None, None, block), lambda b, h, i: (b, 0, i))
    return pl.BlockSpec((None, None, block), lambda b, h, i: (b, h, i))


def token_spec(block: int, width: int) -> pl.BlockSpec:
    """Program (b, h, i) reads rows [i * block, (i + 1) * block) of a [B, Hkv, rows, width] array."""
    return pl.BlockSpec((None, None, block, width), lambda b, h, i: (b, h, i, 0))


def partials_call(
    kernel: Callable, grid: tuple[int, int, int], in_specs: Sequence[pl.BlockSpec], args: Sequence[jax.Array],
    rows: int, head_dim: int, interpret: bool,
) -> Partials:  # fmt: skip
    """Launch ``kernel(*in_refs, m_ref, l_ref, o_ref)`` over ``grid`` = (B, Hkv, num_blocks)."""
    ml = pl.BlockSpec((None, None, None, rows), lambda b, h, i: (b, h, i, 0))
    o = pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, i: (b, h, i, 0, 0))
    return pl.pallas_call(
        kernel, out_shape=partial_shapes(*grid, rows, head_dim), grid=grid, in_specs=list(in_specs),
        out_specs=(ml, ml, o), interpret=interpret, compiler_params=COMPILER_PARAMS,
    )(*args)  # fmt: skip
