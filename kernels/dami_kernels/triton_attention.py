"""Decode attention in Triton (``triton.language``), launched on GPU through
``jax_triton.triton_call``: quantized (store + residual) and dense (a per-slot cache), each
reading its rows' live slots only.

The same split loop as the Pallas kernels (:mod:`dami_kernels.blocks`: block sizes, splits,
query rows, masks, lengths, partials and their merge are shared; only the kernel bodies are
Triton), checked against the same references.

Program (b, h, j) = (``program_id`` 0, 1, 2) reads what its Pallas twin reads
(:mod:`dami_kernels.quant_attention`, :mod:`dami_kernels.decode_attention`), addressed by
pointer arithmetic over row-major arrays: row b's length; query rows ``q[b, h]`` [ROWS, HD];
for each block of its run, tokens t = i * BLOCK + [0, BLOCK) (loads masked past the length):
- store: key word ``t // per`` (bit ``bits * (t % per)``) and key scale/zero of group
  ``t // group`` for every channel; value word ``c // per`` (bit ``bits * (c % per)``) and value
  scale/zero of group ``c // group`` for every channel c of token t. Codes are extracted from
  words loaded once per code (repeat loads of a word hit the cache) and dequantized in registers;
- dense: K and V rows t, cast to float32;
- the visibility mask, row h of a per-head mask, else row 0 (none without a mask).
Dots run in IEEE float32 (``input_precision="ieee"``, no TF32), as in the Pallas kernels.

This module imports ``triton`` (the ``dev`` extra, or a GPU machine's install); ``jax_triton``
is imported on first launch only, as it refuses to import without a CUDA jax. A launch is a
plain description (:class:`Launch`), so the same kernels also run through Triton's CPU
interpreter (``TRITON_INTERPRET=1`` before importing this module, torch CPU tensors).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import triton
import triton.language as tl

from dami_jax.models.attention import MASKED_SCORE
from dami_kernels.blocks import (
    SPLITS,
    Partials,
    Segment,
    attend,
    num_splits,
    partial_shapes,
    quantized_block,
    token_block,
)
from dami_kernels.packing import QuantizedKeys, QuantizedValues

NUM_WARPS, NUM_STAGES = 4, 2
MASKED = tl.constexpr(MASKED_SCORE)


@triton.jit
def _run(lengths_ptr, BLOCK: tl.constexpr, SPLITS: tl.constexpr):
    """-> (b * Hkv + h as int64, row b's live slots, this program's blocks [lo, hi)): the row's
    live blocks dealt to the splits in contiguous runs (:func:`dami_kernels.blocks.split_blocks`)."""
    b = tl.program_id(0).to(tl.int64)
    live_slots = tl.load(lengths_ptr + b)
    per = tl.cdiv(tl.cdiv(live_slots, BLOCK), SPLITS)
    lo = tl.program_id(2) * per
    return b * tl.num_programs(1) + tl.program_id(1), live_slots, lo, tl.minimum(lo + per, tl.cdiv(live_slots, BLOCK))


@triton.jit
def _start(q_ptr, bh, ROWS: tl.constexpr, HD: tl.constexpr):
    """-> the query rows [ROWS, HD] float32 and the empty partials (m, l, o)."""
    r = tl.arange(0, ROWS)
    q = tl.load(q_ptr + (bh * ROWS + r[:, None]) * HD + tl.arange(0, HD)[None, :])
    return q, tl.full([ROWS], float("-inf"), tl.float32), tl.zeros([ROWS], tl.float32), tl.zeros([ROWS, HD], tl.float32)


@triton.jit
def _visible(mask_ptr, pos, live, S: tl.constexpr, MASK_HEADS: tl.constexpr):
    """bool [BLOCK]: live and not masked (MASK_HEADS = 0: no mask)."""
    visible = live
    if MASK_HEADS > 0:
        row = tl.program_id(0).to(tl.int64) * MASK_HEADS + tl.program_id(1) % MASK_HEADS
        visible = tl.load(mask_ptr + row * S + pos, mask=live, other=0) != 0
    return visible


@triton.jit
def _fold(q, k, v, live, visible, m, total, o):
    """The partials (m, l, o) with one more block: k, v float32 [BLOCK, HD] (as
    :func:`dami_kernels.blocks.fold`)."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee")
    s = tl.where(live[None, :], tl.where(visible[None, :], s, MASKED), float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    rescale = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    return m_new, total * rescale + tl.sum(p, axis=1), o * rescale[:, None] + tl.dot(p, v, input_precision="ieee")


@triton.jit
def _store(m, total, o, m_ptr, l_ptr, o_ptr, ROWS: tl.constexpr, HD: tl.constexpr):
    """Write this program's partials at its slot (b, h, j) of the outputs."""
    program = (tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2)
    program += tl.program_id(2)
    r = tl.arange(0, ROWS)
    tl.store(m_ptr + program * ROWS + r, m)
    tl.store(l_ptr + program * ROWS + r, total)
    tl.store(o_ptr + (program * ROWS + r[:, None]) * HD + tl.arange(0, HD)[None, :], o)


@triton.jit
def _dequantize(words_ptrs, scale_ptrs, zero_ptrs, ok, slot, BITS: tl.constexpr):
    """Codes at bit ``BITS * slot`` of the words at ``words_ptrs`` -> float32 codes * scale + zero
    (pointer and slot tensors broadcast to [BLOCK, HD]; zeros where ``ok`` is False)."""
    words = tl.load(words_ptrs, mask=ok, other=0)
    codes = (words >> (slot * BITS)) & ((1 << BITS) - 1)
    scale = tl.load(scale_ptrs, mask=ok, other=0.0).to(tl.float32)
    return codes.to(tl.float32) * scale + tl.load(zero_ptrs, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def dense_split_kernel(q_ptr, lengths_ptr, mask_ptr, k_ptr, v_ptr, m_ptr, l_ptr, o_ptr, S: tl.constexpr,
                       HD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr,
                       MASK_HEADS: tl.constexpr):  # fmt: skip
    bh, live_slots, lo, hi = _run(lengths_ptr, BLOCK, SPLITS)
    q, m, total, o = _start(q_ptr, bh, ROWS, HD)
    for i in range(lo, hi):
        pos = i * BLOCK + tl.arange(0, BLOCK)
        live = pos < live_slots
        offsets = (bh * S + pos[:, None]) * HD + tl.arange(0, HD)[None, :]
        k = tl.load(k_ptr + offsets, mask=live[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=live[:, None], other=0.0).to(tl.float32)
        m, total, o = _fold(q, k, v, live, _visible(mask_ptr, pos, live, S, MASK_HEADS), m, total, o)
    _store(m, total, o, m_ptr, l_ptr, o_ptr, ROWS, HD)


@triton.jit
def quant_split_kernel(q_ptr, lengths_ptr, mask_ptr, kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr, m_ptr, l_ptr,
                       o_ptr, S: tl.constexpr, HD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                       SPLITS: tl.constexpr, MASK_HEADS: tl.constexpr, K_BITS: tl.constexpr, K_GROUP: tl.constexpr,
                       V_BITS: tl.constexpr, V_GROUP: tl.constexpr):  # fmt: skip
    bh, live_slots, lo, hi = _run(lengths_ptr, BLOCK, SPLITS)
    q, m, total, o = _start(q_ptr, bh, ROWS, HD)
    K_PER: tl.constexpr = 32 // K_BITS
    V_PER: tl.constexpr = 32 // V_BITS
    c = tl.arange(0, HD)[None, :]
    for i in range(lo, hi):
        pos = i * BLOCK + tl.arange(0, BLOCK)
        live = pos < live_slots
        t = pos[:, None]
        key_groups = (bh * (S // K_GROUP) + t // K_GROUP) * HD + c
        k = _dequantize(kw_ptr + (bh * (S // K_PER) + t // K_PER) * HD + c, ks_ptr + key_groups, kz_ptr + key_groups,
                        live[:, None], t % K_PER, K_BITS)  # fmt: skip
        value_groups = (bh * S + t) * (HD // V_GROUP) + c // V_GROUP
        v = _dequantize(vw_ptr + (bh * S + t) * (HD // V_PER) + c // V_PER, vs_ptr + value_groups,
                        vz_ptr + value_groups, live[:, None], c % V_PER, V_BITS)  # fmt: skip
        m, total, o = _fold(q, k, v, live, _visible(mask_ptr, pos, live, S, MASK_HEADS), m, total, o)
    _store(m, total, o, m_ptr, l_ptr, o_ptr, ROWS, HD)


@dataclasses.dataclass(frozen=True)
class Launch:
    """``kernel[grid](*args, *outputs, **constants)``: args are arrays, outputs their shapes."""

    kernel: Any
    grid: tuple[int, int, int]
    args: tuple[jax.Array, ...]
    outputs: tuple[jax.ShapeDtypeStruct, ...]
    constants: dict[str, int]


def _launch(kernel, rows: jax.Array, segment: Segment, arrays: tuple, block: int, splits: int, **constants) -> Launch:
    b, hkv, num_rows, hd = rows.shape
    s = segment.k.shape[2]
    grid = (b, hkv, num_splits(s, block, splits))
    mask = segment.mask
    constants = dict(S=s, HD=hd, ROWS=num_rows, BLOCK=block, SPLITS=grid[2],
                     MASK_HEADS=0 if mask is None else mask.shape[1], **constants)  # fmt: skip
    # A kernel's pointer arguments are fixed: without a mask, the lengths stand in its place, never read.
    args = (rows, segment.lengths, segment.lengths if mask is None else mask, *arrays)
    return Launch(kernel, grid, args, partial_shapes(*grid, num_rows, hd), constants)


def dense_launch(rows: jax.Array, segment: Segment, *, block: int, splits: int) -> Launch:
    """As :func:`dami_kernels.decode_attention.dense_partials`."""
    bt = token_block(segment.k.shape[2], block)
    return _launch(dense_split_kernel, rows, segment, (segment.k, segment.v), bt, splits)


def quant_launch(rows: jax.Array, segment: Segment, *, block: int, splits: int) -> Launch:
    """As :func:`dami_kernels.quant_attention.quant_partials`."""
    keys, values = segment.k, segment.v
    arrays = (keys.codes, keys.scale, keys.zero, values.codes, values.scale, values.zero)
    return _launch(quant_split_kernel, rows, segment, arrays, quantized_block(keys, values, block), splits,
                   K_BITS=keys.bits, K_GROUP=keys.group, V_BITS=values.bits, V_GROUP=values.group)  # fmt: skip


def jax_triton_launch(launch: Launch) -> Partials:
    """Run a launch on GPU through ``jax_triton.triton_call`` (traceable under jit)."""
    import jax_triton  # CUDA jax only

    return tuple(
        jax_triton.triton_call(
            *launch.args,
            kernel=launch.kernel,
            out_shape=launch.outputs,
            grid=launch.grid,
            num_warps=NUM_WARPS,
            num_stages=NUM_STAGES,
            **launch.constants,
        )
    )


def _launchers(block: int, splits: int, launch: Callable[[Launch], Partials]):
    """(dense, quantized) launchers for :func:`dami_kernels.blocks.attend`."""
    def run(describe):
        return lambda rows, segment: launch(describe(rows, segment, block=block, splits=splits))

    return run(dense_launch), run(quant_launch)


def quantized_attention(q: jax.Array, keys: QuantizedKeys, values: QuantizedValues, k_res: jax.Array, v_res: jax.Array,
                        mask_quant: jax.Array | None, mask_res: jax.Array | None, *,
                        lengths_quant: jax.Array | None = None, lengths_res: jax.Array | None = None, block: int = 64,
                        splits: int = SPLITS, launch: Callable[[Launch], Partials] = jax_triton_launch
                        ) -> jax.Array:  # fmt: skip
    """The arguments and float32 [B, 1, Hq, hd] result of
    :func:`dami_kernels.quant_attention.quantized_attention` (one query step); ``launch`` runs
    each :class:`Launch` (default: on GPU through jax-triton)."""
    segments = [Segment(keys, values, mask_quant, lengths_quant), Segment(k_res, v_res, mask_res, lengths_res)]
    return attend(q, segments, *_launchers(block, splits, launch))


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *, block: int = 64,
                     splits: int = SPLITS, launch: Callable[[Launch], Partials] = jax_triton_launch
                     ) -> jax.Array:  # fmt: skip
    """As :func:`dami_kernels.decode_attention.decode_attention`: q [B, 1, Hq, hd]; k, v
    [B, Hkv, S, hd]; lengths int32 [B] -> float32 [B, 1, Hq, hd], reading row b's slots
    [0, lengths[b]) only (a row of length 0 gets zeros)."""
    dense, _ = _launchers(block, splits, launch)
    return attend(q, [Segment(k, v, None, lengths)], dense)
