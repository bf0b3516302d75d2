"""Pallas plumbing shared by the Pallas kernels: the Triton lowering, masked loads, and the
split loop over a segment's live blocks (see :mod:`dami_kernels.blocks` for the algorithm).

The kernels target Pallas' Triton lowering on GPU (``compiler_params`` selects it: recent JAX
lowers plain ``pallas_call`` to Mosaic GPU by default) and run anywhere with ``interpret=True``.
Triton's rules shape them: every loaded tensor has a power-of-two size, dots are 2-D, and a
load that overruns its array is not bounds-checked, so every block is loaded with a mask (zeros
where the slot is not live). Under that lowering a ref is a pointer and nothing is read until
the kernel loads it, so a program of the split loop hands each (row, KV head) whole to the
kernel and loads only the blocks of its run.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from dami_kernels.blocks import Partials, Segment, empty_partials, fold, num_splits, partial_shapes, split_blocks

COMPILER_PARAMS = pltriton.CompilerParams(num_warps=4, num_stages=2)

# read_block(refs, start, live) -> float32 k, v [block, hd]: the block of tokens [start, start +
# block) from a segment's refs; live(stride) -> bool [block // stride] says which entries of a run
# with one entry per ``stride`` tokens from ``start`` hold a live token.
BlockReader = Callable[[Sequence, jax.Array, Callable[..., jax.Array]], tuple[jax.Array, jax.Array]]


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


def rows_at(ref, start: jax.Array, live: jax.Array):
    """Rows [start, start + n) of ``ref`` [N, ...] (n = len(live)), those not live read as zeros."""
    return load_rows(ref.at[pl.ds(pl.multiple_of(start, live.shape[0]), live.shape[0])], live)


def row_spec(array: jax.Array) -> pl.BlockSpec:
    """Program (b, h, j) sees row (b, h) of ``array`` [B, Hkv, ...] whole (it loads only its run)."""
    return pl.BlockSpec((None, None, *array.shape[2:]), lambda b, h, j: (b, h) + (0,) * (array.ndim - 2))


def _mask_spec(mask: jax.Array | None) -> pl.BlockSpec | None:
    """Program (b, h, j) sees row h (per-head mask) or row 0 of int32 [B, 1 or Hkv, S], whole."""
    if mask is None:
        return None
    head = (lambda h: 0) if mask.shape[1] == 1 else (lambda h: h)
    return pl.BlockSpec((None, None, mask.shape[2]), lambda b, h, j: (b, head(h), 0))


def _split_kernel(q_ref, lengths_ref, mask_ref, *refs, read_block: BlockReader, block: int, splits: int):
    *segment_refs, m_ref, l_ref, o_ref = refs
    live_slots = lengths_ref[...]
    lo, hi = split_blocks(live_slots, block, splits, pl.program_id(2))
    q = q_ref[...]

    def add_block(i, partials):
        start = i * block

        def live(stride: int = 1) -> jax.Array:
            return start + jax.lax.broadcasted_iota(jnp.int32, (block // stride,), 0) * stride < live_slots

        k, v = read_block(segment_refs, start, live)
        visible = None if mask_ref is None else rows_at(mask_ref, start, live()) != 0
        return fold(partials, q, k, v, live(), visible)

    m_ref[...], l_ref[...], o_ref[...] = jax.lax.fori_loop(lo, hi, add_block, empty_partials(*q.shape))


def split_partials(
    read_block: BlockReader, rows: jax.Array, segment: Segment, arrays: Sequence[jax.Array], *, block: int,
    splits: int, interpret: bool,
) -> Partials:  # fmt: skip
    """A segment's partials: rows [B, Hkv, rows, hd] (:func:`query_rows`); ``segment``'s mask and
    lengths prepared (:func:`dami_kernels.blocks.attend`); ``arrays`` [B, Hkv, ...] the refs that
    ``read_block`` reads, ``block`` tokens at a time."""
    b, hkv, num_rows, hd = rows.shape
    grid = (b, hkv, num_splits(segment.k.shape[2], block, splits))
    query = pl.BlockSpec((None, None, num_rows, hd), lambda b, h, j: (b, h, 0, 0))
    lengths = pl.BlockSpec((None,), lambda b, h, j: (b,))
    ml = pl.BlockSpec((None, None, None, num_rows), lambda b, h, j: (b, h, j, 0))
    o = pl.BlockSpec((None, None, None, num_rows, hd), lambda b, h, j: (b, h, j, 0, 0))
    kernel = functools.partial(_split_kernel, read_block=read_block, block=block, splits=grid[2])
    return pl.pallas_call(
        kernel, out_shape=partial_shapes(*grid, num_rows, hd), grid=grid,
        in_specs=[query, lengths, _mask_spec(segment.mask), *map(row_spec, arrays)], out_specs=(ml, ml, o),
        interpret=interpret, compiler_params=COMPILER_PARAMS,
    )(rows, segment.lengths, segment.mask, *arrays)  # fmt: skip
