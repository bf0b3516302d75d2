"""Full-precision decode attention (Pallas), one query step over one or more KV segments.

The reference is :func:`dami_jax.models.attention.attention` over the segments concatenated
along tokens. Serves the quantized layers' full-precision residual window
(:mod:`dami_kernels.quant_attention`) and the sparse layers' attention over sink + recent,
the gathered top-k rows and the generated tokens, each part its own segment: the parts are
never concatenated.

Program (b, h, i) of a segment of S tokens reads (block algorithm: :mod:`dami_kernels.blocks`):
- the query rows of KV head h: float32 [rows, hd];
- block i of K and V: [block, hd] each, in their dtype (cast to float32 in the kernel);
- block i of the visibility mask: int32 [block], row h of a per-head mask, else row 0;
and writes its partial (m, l, o). ``block`` is the requested power of two, or the power of two
covering a shorter segment.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
from jax.experimental import pallas as pl

from dami_kernels.blocks import F32, Partials, block_softmax, combine, query_rows, token_block, visibility
from dami_kernels.pallas_blocks import (
    load_rows,
    mask_spec,
    partials_call,
    program_rows,
    query_spec,
    store_partials,
    token_spec,
)


def _dense_kernel(q_ref, k_ref, v_ref, mask_ref, m_ref, l_ref, o_ref, *, length: int):
    exists = program_rows(length, k_ref.shape[0])
    k, v = load_rows(k_ref, exists).astype(F32), load_rows(v_ref, exists).astype(F32)
    store_partials(m_ref, l_ref, o_ref, block_softmax(q_ref[...], k, v, exists, load_rows(mask_ref, exists) != 0))


def dense_partials(
    rows: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, block: int, interpret: bool
) -> Partials:
    """rows [B, Hkv, rows, hd] (:func:`query_rows`); k, v [B, Hkv, S, hd]; mask int32 [B, 1 or
    Hkv, S] (:func:`visibility`) -> the segment's partials."""
    b, hkv, s, hd = k.shape
    bt = token_block(s, block)
    specs = [query_spec(rows), token_spec(bt, hd), token_spec(bt, hd), mask_spec(mask, bt)]
    grid = (b, hkv, pl.cdiv(s, bt))
    return partials_call(
        functools.partial(_dense_kernel, length=s), grid, specs, (rows, k, v, mask), rows.shape[2], hd, interpret
    )


def segment_attention(
    q: jax.Array,
    segments: Sequence[tuple[jax.Array, jax.Array, jax.Array]],
    *,
    block: int = 64,
    interpret: bool = False,
) -> jax.Array:
    """q [B, 1, Hq, hd]; segments: (k, v [B, Hkv, S_j, hd], mask bool [B, S_j], [B, 1, S_j] or
    [B, Hkv, S_j]) -> float32 [B, 1, Hq, hd], attention over all segments' tokens at once."""
    hkv = segments[0][0].shape[1]
    rows = query_rows(q, hkv)
    parts = [
        dense_partials(rows, k, v, visibility(mask, hkv), block=block, interpret=interpret) for k, v, mask in segments
    ]
    return combine(parts, q.shape[2])


def decode_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, block: int = 64, interpret: bool = False
) -> jax.Array:
    """:func:`dami_jax.models.attention.attention` for one query step: q [B, 1, Hq, hd]; k, v
    [B, Hkv, S, hd]; mask bool [B, 1, S] or [B, Hkv, 1, S] -> float32 [B, 1, Hq, hd]."""
    return segment_attention(q, [(k, v, mask)], block=block, interpret=interpret)
