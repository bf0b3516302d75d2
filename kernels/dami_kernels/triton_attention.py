"""Quantized decode attention in Triton (``triton.language``), launched on GPU through
``jax_triton.triton_call``.

The same block algorithm as the Pallas kernels (:mod:`dami_kernels.blocks`: block sizes,
query rows, masks, partials and their merge are shared; only the kernel bodies are Triton),
checked against the same reference, :func:`dami_jax.tailorkv.quant_attention.quantized_attention`.

Program (b, h, i) = (``program_id`` 0, 1, 2) reads what its Pallas twin reads
(:mod:`dami_kernels.quant_attention`, :mod:`dami_kernels.decode_attention`), addressed
by pointer arithmetic over row-major arrays: query rows ``q[b, h]`` [ROWS, HD]; for block
tokens t = i * BLOCK + [0, BLOCK) (loads masked past S):
- store: key word ``t // per`` (bit ``bits * (t % per)``) and key scale/zero of group
  ``t // group`` for every channel; value word ``c // per`` (bit ``bits * (c % per)``) and value
  scale/zero of group ``c // group`` for every channel c of token t. Codes are extracted from
  words loaded once per code (repeat loads of a word hit the cache) and dequantized in registers;
- residual: K and V rows t, cast to float32;
- the visibility mask, row h of a per-head mask, else row 0.
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
from dami_kernels.blocks import Partials, attend_quantized, partial_shapes, quantized_block, token_block
from dami_kernels.packing import QuantizedKeys, QuantizedValues

NUM_WARPS, NUM_STAGES = 4, 2
MASKED = tl.constexpr(MASKED_SCORE)


@triton.jit
def _prologue(q_ptr, mask_ptr, S: tl.constexpr, HD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
              MASK_HEADS: tl.constexpr):  # fmt: skip
    """-> (b * Hkv + h as int64, this program's index, token positions [BLOCK], which exist,
    query rows [ROWS, HD] float32, visible [BLOCK])."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    bh = b * tl.num_programs(1) + h
    pos = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    exists = pos < S
    r = tl.arange(0, ROWS)
    q = tl.load(q_ptr + (bh * ROWS + r[:, None]) * HD + tl.arange(0, HD)[None, :])
    visible = tl.load(mask_ptr + (b * MASK_HEADS + h % MASK_HEADS) * S + pos, mask=exists, other=0) != 0
    return bh, bh * tl.num_programs(2) + tl.program_id(2), pos, exists, q, visible


@triton.jit
def _block_softmax_store(q, k, v, exists, visible, m_ptr, l_ptr, o_ptr, program, ROWS: tl.constexpr, HD: tl.constexpr):
    """The block's partials (m, l, o) of q [ROWS, HD] against k, v float32 [BLOCK, HD], stored
    at ``program``'s slot of the partial outputs."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee")
    s = tl.where(exists[None, :], tl.where(visible[None, :], s, MASKED), float("-inf"))
    m = tl.max(s, axis=1)
    p = tl.exp(s - m[:, None])
    o = tl.dot(p, v, input_precision="ieee")
    r = tl.arange(0, ROWS)
    tl.store(m_ptr + program * ROWS + r, m)
    tl.store(l_ptr + program * ROWS + r, tl.sum(p, axis=1))
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
def dense_block_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, m_ptr, l_ptr, o_ptr, S: tl.constexpr, HD: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK: tl.constexpr, MASK_HEADS: tl.constexpr):  # fmt: skip
    bh, program, pos, exists, q, visible = _prologue(q_ptr, mask_ptr, S, HD, ROWS, BLOCK, MASK_HEADS)
    offsets = (bh * S + pos[:, None]) * HD + tl.arange(0, HD)[None, :]
    k = tl.load(k_ptr + offsets, mask=exists[:, None], other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offsets, mask=exists[:, None], other=0.0).to(tl.float32)
    _block_softmax_store(q, k, v, exists, visible, m_ptr, l_ptr, o_ptr, program, ROWS, HD)


@triton.jit
def quant_block_kernel(q_ptr, kw_ptr, ks_ptr, kz_ptr, vw_ptr, vs_ptr, vz_ptr, mask_ptr, m_ptr, l_ptr, o_ptr,
                       S: tl.constexpr, HD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                       MASK_HEADS: tl.constexpr, K_BITS: tl.constexpr, K_GROUP: tl.constexpr, V_BITS: tl.constexpr,
                       V_GROUP: tl.constexpr):  # fmt: skip
    bh, program, pos, exists, q, visible = _prologue(q_ptr, mask_ptr, S, HD, ROWS, BLOCK, MASK_HEADS)
    K_PER: tl.constexpr = 32 // K_BITS
    V_PER: tl.constexpr = 32 // V_BITS
    t = pos[:, None]
    c = tl.arange(0, HD)[None, :]
    ok = exists[:, None]
    key_groups = (bh * (S // K_GROUP) + t // K_GROUP) * HD + c
    k = _dequantize(kw_ptr + (bh * (S // K_PER) + t // K_PER) * HD + c, ks_ptr + key_groups, kz_ptr + key_groups,
                    ok, t % K_PER, K_BITS)  # fmt: skip
    value_groups = (bh * S + t) * (HD // V_GROUP) + c // V_GROUP
    v = _dequantize(vw_ptr + (bh * S + t) * (HD // V_PER) + c // V_PER, vs_ptr + value_groups, vz_ptr + value_groups,
                    ok, c % V_PER, V_BITS)  # fmt: skip
    _block_softmax_store(q, k, v, exists, visible, m_ptr, l_ptr, o_ptr, program, ROWS, HD)


@dataclasses.dataclass(frozen=True)
class Launch:
    """``kernel[grid](*args, *outputs, **constants)``: args are arrays, outputs their shapes."""

    kernel: Any
    grid: tuple[int, int, int]
    args: tuple[jax.Array, ...]
    outputs: tuple[jax.ShapeDtypeStruct, ...]
    constants: dict[str, int]


def _launch(kernel, rows: jax.Array, args: tuple, mask: jax.Array, length: int, block: int, **constants) -> Launch:
    b, hkv, num_rows, hd = rows.shape
    grid = (b, hkv, -(-length // block))
    constants = dict(S=length, HD=hd, ROWS=num_rows, BLOCK=block, MASK_HEADS=mask.shape[1], **constants)
    return Launch(kernel, grid, (rows, *args, mask), partial_shapes(*grid, num_rows, hd), constants)


def dense_launch(rows: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, block: int) -> Launch:
    """As :func:`dami_kernels.decode_attention.dense_partials`."""
    s = k.shape[2]
    return _launch(dense_block_kernel, rows, (k, v), mask, s, token_block(s, block))


def quant_launch(
    rows: jax.Array, keys: QuantizedKeys, values: QuantizedValues, mask: jax.Array, *, block: int
) -> Launch:
    """As :func:`dami_kernels.quant_attention.quant_partials`."""
    args = (keys.codes, keys.scale, keys.zero, values.codes, values.scale, values.zero)
    return _launch(quant_block_kernel, rows, args, mask, keys.num_tokens, quantized_block(keys, values, block),
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


def quantized_attention(
    q: jax.Array,
    keys: QuantizedKeys,
    values: QuantizedValues,
    k_res: jax.Array,
    v_res: jax.Array,
    mask_quant: jax.Array,
    mask_res: jax.Array,
    *,
    block: int = 64,
    launch: Callable[[Launch], Partials] = jax_triton_launch,
) -> jax.Array:
    """The reference's arguments and float32 [B, 1, Hq, hd] result (one query step);
    ``launch`` runs each :class:`Launch` (default: on GPU through jax-triton)."""
    quant = lambda rows, keys, values, mask: launch(quant_launch(rows, keys, values, mask, block=block))  # noqa: E731
    dense = lambda rows, k, v, mask: launch(dense_launch(rows, k, v, mask, block=block))  # noqa: E731
    return attend_quantized(q, keys, values, k_res, v_res, mask_quant, mask_res, quant, dense)
