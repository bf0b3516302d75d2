"""The block algorithm every decode kernel here shares (Pallas and Triton): flash-decoding.

One query step of GQA attention is split over programs ``(b, h, i)``: batch row, KV head and
token block. A program reads block ``i`` (``block`` tokens) of one KV head's keys and values
once, for all query heads of that KV head's group at the same time: the group's G query rows
are padded with zero rows to ``rows`` (a power of two >= 16: Triton tensors have power-of-two
sizes and its dots need M >= 16), pre-scaled by hd**-0.5. The program writes the block's
partial softmax, for each row:

    m = max_s score_s,    l = sum_s exp(score_s - m),    o = sum_s exp(score_s - m) v_s

with ``m, l: float32 [B, Hkv, num_blocks, rows]`` and ``o: float32 [B, Hkv, num_blocks, rows,
hd]``. :func:`combine` merges the partials of every block of every segment (M = max m;
out = sum exp(m - M) o / sum exp(m - M) l). Segments (a quantized store, a full-precision
residual, a sparse layer's window / top-k / generated tokens) are separate launches whose
partials meet only there: nothing is concatenated or padded in memory.

Masked slots score ``MASKED_SCORE``, as in the pure-jnp references; slots past a segment's end
(the last block of a length that is not a multiple of ``block``) are loaded masked as zeros and
score -inf, so they do not exist. A row whose every slot is masked then averages its real slots
uniformly, like the reference softmax over MASKED_SCORE. Every block holds at least one real
slot (grids are ceil(length / block)), so m is finite.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from dami_jax.models.attention import MASKED_SCORE
from dami_kernels.packing import QuantizedKeys, QuantizedValues, codes_per_word

F32 = jnp.float32
MIN_DOT = 16  # Triton dots take M, N, K >= 16: query rows, head_dim and block sizes

Partials = tuple[jax.Array, jax.Array, jax.Array]  # (m, l, o), shapes in the module docstring


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def head_dim_fits(head_dim: int) -> bool:
    """The kernels' dots take head_dim as a dimension: a power of two >= 16."""
    return is_power_of_2(head_dim) and head_dim >= MIN_DOT


def token_block(length: int, block: int, multiple: int = 1) -> int:
    """Tokens per program: ``block`` (a power of two >= 16), or fewer for a short segment (the
    power of two covering it), never below ``multiple`` (a power of two)."""
    if not is_power_of_2(block) or block < MIN_DOT:
        raise ValueError(f"block must be a power of two >= {MIN_DOT}, got block={block}")
    return max(multiple, MIN_DOT, min(block, next_power_of_2(length)))


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


def visibility(mask: jax.Array, kv_heads: int) -> jax.Array:
    """A bool mask [B, S], [B, 1, S] (every head) or [B, Hkv, S] -> int32 [B, 1 or Hkv, S], the
    layout the kernels read (program (b, h) reads row h of a per-head mask, else row 0)."""
    mask = mask.reshape(mask.shape[0], -1, mask.shape[-1])
    if mask.shape[1] not in (1, kv_heads):
        raise ValueError(f"mask {mask.shape}: expected one row per batch entry or per KV head ({kv_heads})")
    return mask.astype(jnp.int32)


def block_softmax(q: jax.Array, k: jax.Array, v: jax.Array, in_range: jax.Array, visible: jax.Array) -> Partials:
    """One block's partials, in jnp for the Pallas kernels. q [rows, hd], k, v float32 [block, hd];
    in_range, visible bool [block]. Dots run in full float32 (no TF32)."""
    s = jax.lax.dot_general(
        q, k, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST, preferred_element_type=F32
    )
    s = jnp.where(in_range[None, :], jnp.where(visible[None, :], s, MASKED_SCORE), -jnp.inf)
    m = s.max(axis=1)
    p = jnp.exp(s - m[:, None])
    o = jax.lax.dot_general(
        p, v, (((1,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST, preferred_element_type=F32
    )
    return m, p.sum(axis=1), o


def partial_shapes(
    batch: int, kv_heads: int, num_blocks: int, rows: int, head_dim: int
) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The (m, l, o) outputs of one launch over ``num_blocks`` blocks."""
    ml = jax.ShapeDtypeStruct((batch, kv_heads, num_blocks, rows), F32)
    return ml, ml, jax.ShapeDtypeStruct((batch, kv_heads, num_blocks, rows, head_dim), F32)


def combine(parts: Sequence[Partials], num_heads: int) -> jax.Array:
    """Merge the partials of every launch -> float32 [B, 1, Hq, hd] (query head h * G + g)."""
    m, total, o = (jnp.concatenate([p[i] for p in parts], axis=2) for i in range(3))
    w = jnp.exp(m - m.max(axis=2, keepdims=True))
    out = (w[..., None] * o).sum(axis=2) / (w * total).sum(axis=2)[..., None]  # [B, Hkv, rows, hd]
    b, hkv, _, hd = out.shape
    return out[:, :, : num_heads // hkv].reshape(b, 1, num_heads, hd)


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
    """Tokens per program over the store (whole key groups); ValueError if :func:`unsupported`."""
    check_quantized(keys, values)
    return token_block(keys.num_tokens, block, multiple=keys.group)


def attend_quantized(
    q: jax.Array,
    keys: QuantizedKeys,
    values: QuantizedValues,
    k_res: jax.Array,
    v_res: jax.Array,
    mask_quant: jax.Array,
    mask_res: jax.Array,
    quant_partials: Callable[..., Partials],
    dense_partials: Callable[..., Partials],
) -> jax.Array:
    """Quantized decode attention from a backend's two launches: ``quant_partials(rows, keys,
    values, mask)`` over the store and ``dense_partials(rows, k, v, mask)`` over the residual
    (rows from :func:`query_rows`, masks from :func:`visibility`), merged by :func:`combine`."""
    check_quantized(keys, values)
    hkv = k_res.shape[1]
    rows = query_rows(q, hkv)
    parts = [
        quant_partials(rows, keys, values, visibility(mask_quant, hkv)),
        dense_partials(rows, k_res, v_res, visibility(mask_res, hkv)),
    ]
    return combine(parts, q.shape[2])
