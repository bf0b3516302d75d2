"""The algorithm every decode kernel here shares (Pallas and Triton): split-K flash decoding over
each row's live slots only.

A segment holds S slots per row, ``[B, Hkv, S, ...]``, of which row b's first ``n_b`` are live
(``lengths[b]``, clipped to [0, S]; all S without lengths). One query step of GQA attention over
it runs as programs ``(b, h, j)``: batch row, KV head and split j of ``splits``. Row b's
ceil(n_b / block) live blocks are dealt to the splits in contiguous runs of equal size
(:func:`split_blocks`); a program loops over its run, reading each block of one KV head's keys
and values once, for all query heads of that head's group at the same time (the G query rows
padded with zero rows to ``rows``, a power of two >= 16: Triton tensors have power-of-two sizes
and its dots need M >= 16; pre-scaled by hd**-0.5), and folds it into a running partial softmax
(:func:`fold`), for each query row:

    m = max_s score_s,    l = sum_s exp(score_s - m),    o = sum_s exp(score_s - m) v_s

A program whose run is empty loads nothing and writes the empty partial (m = -inf, l = 0, o = 0).
So a step reads the live blocks of each row, not the S slots a cache was sized for, and the
partials (m, l: float32 [B, Hkv, splits, rows]; o: float32 [B, Hkv, splits, rows, hd]) are sized
by ``splits``, not by S. :func:`combine` merges the partials of every split of every segment
(M = max m; out = sum exp(m - M) o / sum exp(m - M) l): empty partials weigh nothing, and a row
with no live slot in any segment gets zeros. Segments (a quantized store, a full-precision
residual, a sparse layer's window / top-k / generated tokens; a dense cache) are separate
launches whose partials meet only there: nothing is concatenated or padded in memory.

Live slots that a segment's mask hides score ``MASKED_SCORE``, as in the pure-jnp references (a
row whose live slots are all masked averages them uniformly); slots past ``n_b`` in the last live
block are loaded masked as zeros and score -inf: they do not exist, like slots past S.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from dami_jax.models.attention import MASKED_SCORE
from dami_kernels.packing import QuantizedKeys, QuantizedValues, codes_per_word

F32 = jnp.float32
MIN_DOT = 16  # Triton dots take M, N, K >= 16: query rows, head_dim and block sizes
SPLITS = 16  # programs per (row, KV head): B * Hkv * 16 keeps a GPU's SMs busy at batch 1

Partials = tuple[jax.Array, jax.Array, jax.Array]  # (m, l, o), shapes in the module docstring


class Segment(NamedTuple):
    """One launch's KV: k, v [B, Hkv, S, hd]; mask bool [B, S], [B, 1, S] or [B, Hkv, S] (None:
    every live slot visible); lengths int32 [B], live slots per row (None: all S)."""

    k: jax.Array
    v: jax.Array
    mask: jax.Array | None = None
    lengths: jax.Array | None = None


Launcher = Callable[[jax.Array, Segment], Partials]  # (query rows, a prepared segment) -> its partials


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def head_dim_fits(head_dim: int) -> bool:
    """The kernels' dots take head_dim as a dimension: a power of two >= 16."""
    return is_power_of_2(head_dim) and head_dim >= MIN_DOT


def token_block(length: int, block: int, multiple: int = 1) -> int:
    """Tokens per loop step: ``block`` (a power of two >= 16), or fewer for a short segment (the
    power of two covering it), never below ``multiple`` (a power of two)."""
    if not is_power_of_2(block) or block < MIN_DOT:
        raise ValueError(f"block must be a power of two >= {MIN_DOT}, got block={block}")
    return max(multiple, MIN_DOT, min(block, next_power_of_2(length)))


def num_splits(length: int, block: int, splits: int) -> int:
    """Programs per (row, KV head) over a segment of ``length`` slots: ``splits``, or fewer when
    the segment has fewer blocks."""
    if not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits must be a positive int, got splits={splits!r}")
    return max(1, min(splits, -(-length // block)))


def split_blocks(live: jax.Array, block: int, splits: int, split: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Blocks [lo, hi) of program ``split`` (of ``splits``) over a row of ``live`` live slots:
    its ceil(live / block) blocks dealt in contiguous runs of ceil(blocks / splits)."""
    blocks = (live + block - 1) // block
    per = (blocks + splits - 1) // splits
    lo = split * per
    return lo, jnp.minimum(lo + per, blocks)


def row_lengths(lengths: jax.Array | None, batch: int, length: int) -> jax.Array:
    """int32 [B]: live slots per row of a segment of ``length`` slots (all of them for None)."""
    if lengths is None:
        return jnp.full((batch,), length, jnp.int32)
    if jnp.shape(lengths) != (batch,):
        raise ValueError(f"lengths must be int32 [B={batch}], one per batch row; got shape {jnp.shape(lengths)}")
    return jnp.clip(lengths, 0, length).astype(jnp.int32)


def query_rows(q: jax.Array, kv_heads: int) -> jax.Array:
    """q [B, 1, Hq, hd] -> float32 [B, Hkv, rows, hd]: each KV head's query group, scaled by
    hd**-0.5 and padded with zero rows to ``rows`` = max(16, next power of two >= G)."""
    b, t, hq, hd = q.shape
    if t != 1 or hq % kv_heads or not head_dim_fits(hd):
        raise ValueError(
            f"decode kernels take one query step, Hq a multiple of Hkv and head_dim a power of two >= {MIN_DOT}; "
            f"got q {q.shape}, Hkv={kv_heads}"
        )
    g = hq // kv_heads
    rows = q[:, 0].reshape(b, kv_heads, g, hd).astype(F32) * hd**-0.5
    return jnp.pad(rows, ((0, 0), (0, 0), (0, max(MIN_DOT, next_power_of_2(g)) - g), (0, 0)))


def visibility(mask: jax.Array | None, kv_heads: int) -> jax.Array | None:
    """A bool mask [B, S], [B, 1, S] (every head) or [B, Hkv, S] -> int32 [B, 1 or Hkv, S], the
    layout the kernels read (program (b, h) reads row h of a per-head mask, else row 0)."""
    if mask is None:
        return None
    mask = mask.reshape(mask.shape[0], -1, mask.shape[-1])
    if mask.shape[1] not in (1, kv_heads):
        raise ValueError(f"mask {mask.shape}: expected one row per batch entry or per KV head ({kv_heads})")
    return mask.astype(jnp.int32)


def empty_partials(rows: int, head_dim: int) -> Partials:
    """The partial softmax over no slot: m = -inf, l = 0, o = 0."""
    return jnp.full((rows,), -jnp.inf, F32), jnp.zeros((rows,), F32), jnp.zeros((rows, head_dim), F32)


def fold(
    partials: Partials, q: jax.Array, k: jax.Array, v: jax.Array, live: jax.Array, visible: jax.Array | None
) -> Partials:
    """``partials`` with one more block, in jnp for the Pallas kernels: q [rows, hd], k, v float32
    [block, hd], live bool [block] (at least one True), visible bool [block] or None. Dots run in
    full float32 (no TF32)."""
    m, total, o = partials
    s = jax.lax.dot_general(
        q, k, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST, preferred_element_type=F32
    )
    if visible is not None:
        s = jnp.where(visible[None, :], s, MASKED_SCORE)
    s = jnp.where(live[None, :], s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=1))
    rescale = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    pv = jax.lax.dot_general(
        p, v, (((1,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST, preferred_element_type=F32
    )
    return m_new, rescale * total + p.sum(axis=1), rescale[:, None] * o + pv


def partial_shapes(
    batch: int, kv_heads: int, splits: int, rows: int, head_dim: int
) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The (m, l, o) outputs of one launch of ``splits`` programs per (row, KV head)."""
    ml = jax.ShapeDtypeStruct((batch, kv_heads, splits, rows), F32)
    return ml, ml, jax.ShapeDtypeStruct((batch, kv_heads, splits, rows, head_dim), F32)


def combine(parts: Sequence[Partials], num_heads: int) -> jax.Array:
    """Merge the partials of every launch -> float32 [B, 1, Hq, hd] (query head h * G + g)."""
    m, total, o = (jnp.concatenate([p[i] for p in parts], axis=2) for i in range(3))
    top = m.max(axis=2, keepdims=True)
    w = jnp.exp(m - jnp.where(top > -jnp.inf, top, 0.0))  # empty partials (m = -inf) weigh 0
    norm = (w * total).sum(axis=2)[..., None]
    out = (w[..., None] * o).sum(axis=2) / jnp.where(norm > 0, norm, 1.0)  # [B, Hkv, rows, hd]; no live slot: 0
    b, hkv, _, hd = out.shape
    return out[:, :, : num_heads // hkv].reshape(b, 1, num_heads, hd)


def attend(q: jax.Array, segments: Sequence[Segment], dense: Launcher, quantized: Launcher | None = None) -> jax.Array:
    """q [B, 1, Hq, hd] -> float32 [B, 1, Hq, hd], attention over all ``segments``' live slots
    at once (a segment's rows past B are never read), from a backend's launches: ``dense(rows, segment)``, or ``quantized(rows, segment)``
    for a segment of :class:`QuantizedKeys` and :class:`QuantizedValues` (rows from
    :func:`query_rows`, the segment's mask from :func:`visibility` and its lengths from
    :func:`row_lengths`), merged by :func:`combine`."""
    segments = [Segment(*s) for s in segments]
    for segment in segments:
        if isinstance(segment.k, QuantizedKeys):
            check_quantized(segment.k, segment.v)
    hkv = segments[0].k.shape[1]
    rows = query_rows(q, hkv)
    parts = []
    for segment in segments:  # a segment may hold more rows than q (a per-slot cache whose first B rows decode)
        b, s = q.shape[0], segment.k.shape[2]
        segment = segment._replace(mask=visibility(segment.mask, hkv), lengths=row_lengths(segment.lengths, b, s))
        parts.append((quantized if isinstance(segment.k, QuantizedKeys) else dense)(rows, segment))
    return combine(parts, q.shape[2])


def unsupported(keys: QuantizedKeys, values: QuantizedValues) -> str:
    """Why the quantized kernels cannot read this store ("" when they can): power-of-two tensor
    sizes, and blocks of whole key groups made of whole words."""
    hd, per_k, per_v = keys.head_dim, codes_per_word(keys.bits), codes_per_word(values.bits)
    if keys.num_tokens != values.num_tokens or values.head_dim != hd:
        return f"keys hold {keys.num_tokens} tokens x {hd} channels, values {values.num_tokens} x {values.head_dim}"
    if not head_dim_fits(hd) or hd % per_v:
        need = f"a power of two >= {MIN_DOT} and a multiple of {per_v} ({values.bits}-bit value words)"
        return f"head_dim={hd} must be {need}"
    if not is_power_of_2(keys.group) or keys.group % per_k or not is_power_of_2(values.group):
        groups = f"groups (keys {keys.group}, values {values.group})"
        return f"{groups} must be powers of two, key groups of whole {per_k}-code words"
    return ""


def check_quantized(keys: QuantizedKeys, values: QuantizedValues) -> None:
    if reason := unsupported(keys, values):
        raise ValueError(f"quantized attention kernel: {reason}")


def quantized_block(keys: QuantizedKeys, values: QuantizedValues, block: int) -> int:
    """Tokens per loop step over the store (whole key groups); ValueError if :func:`unsupported`."""
    check_quantized(keys, values)
    return token_block(keys.num_tokens, block, multiple=keys.group)
