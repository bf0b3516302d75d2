"""Full-precision decode attention (Pallas), one query step over one or more KV segments, each
read up to its rows' live lengths only.

The reference is :func:`dami_jax.models.attention.attention` over the segments' live slots
concatenated along tokens (for one dense cache: ``mask = slot < lengths[b]``). Serves a dense
per-slot cache (:func:`decode_attention`: row b holds ``lengths[b]`` live tokens of a capacity
S), the quantized layers' full-precision residual window (:mod:`dami_kernels.quant_attention`)
and the sparse layers' attention over sink + recent, the gathered top-k rows and the generated
tokens, each part its own segment: the parts are never concatenated.

Program (b, h, j) of a segment (split loop: :mod:`dami_kernels.blocks`) reads:
- row b's length: one int32;
- the query rows of KV head h: float32 [rows, hd];
- for each block of its run, tokens [t, t + block): K and V [block, hd] each, in their dtype
  (cast to float32 in the kernel), and the visibility mask int32 [block] (row h of a per-head
  mask, else row 0; none without a mask);
and writes its partial (m, l, o). ``block`` is the requested power of two, or the power of two
covering a shorter segment.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax

from dami_kernels.blocks import F32, SPLITS, Partials, Segment, attend, token_block
from dami_kernels.pallas_blocks import rows_at, split_partials


def _read_dense(refs, start: jax.Array, live) -> tuple[jax.Array, jax.Array]:
    k_ref, v_ref = refs
    return rows_at(k_ref, start, live()).astype(F32), rows_at(v_ref, start, live()).astype(F32)


def dense_partials(rows: jax.Array, segment: Segment, *, block: int, splits: int, interpret: bool) -> Partials:
    """rows [B, Hkv, rows, hd] (:func:`query_rows`); a prepared segment (:func:`attend`) of
    k, v [B, Hkv, S, hd] -> its partials."""
    bt = token_block(segment.k.shape[2], block)
    return split_partials(
        _read_dense, rows, segment, (segment.k, segment.v), block=bt, splits=splits, interpret=interpret
    )


def segment_attention(
    q: jax.Array,
    segments: Sequence[Segment | tuple],
    *,
    block: int = 64,
    splits: int = SPLITS,
    interpret: bool = False,
) -> jax.Array:
    """q [B, 1, Hq, hd]; segments: :class:`Segment` or tuples (k, v [B, Hkv, S_j, hd], mask bool
    [B, S_j], [B, 1, S_j] or [B, Hkv, S_j] or None[, lengths int32 [B] or None]) -> float32
    [B, 1, Hq, hd], attention over all segments' live slots at once (a row with none: zeros).
    ``block``: tokens per loop step (a power of two >= 16); ``splits``: programs per (row, KV head)."""
    launch = functools.partial(dense_partials, block=block, splits=splits, interpret=interpret)
    return attend(q, segments, launch)


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *, block: int = 64,
                     splits: int = SPLITS, interpret: bool = False) -> jax.Array:  # fmt: skip
    """One decode step over a dense per-slot cache: q [B, 1, Hq, hd]; k, v [B, Hkv, S, hd];
    lengths int32 [B] -> float32 [B, 1, Hq, hd]. Row b attends to slots [0, lengths[b]) and
    reads nothing past them; a row of length 0 (an idle slot) gets zeros."""
    return segment_attention(q, [Segment(k, v, None, lengths)], block=block, splits=splits, interpret=interpret)
