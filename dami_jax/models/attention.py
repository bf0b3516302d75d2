"""Grouped-query attention cores (pure jnp), shared by every cache (dense, per-slot, quantized,
offloaded): :func:`attention` over a whole masked cache, :func:`live_attention` over the live
prefix of per-slot cache rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so that a query row with no visible key (a left-padding slot) yields a harmless
# uniform average instead of NaNs that would leak through later reductions.
MASKED_SCORE = -1e30


def fold_queries(q: jax.Array, kv_heads: int, dtype) -> jax.Array:
    """q [B, T, Hq, hd] -> [B, Hkv, G*T, hd] (row g * T + t): the G = Hq / Hkv query heads that
    share a KV head and the T positions as one block of query rows, so that both products of
    attention are plain batched matmuls over (B, Hkv) that read k and v as stored."""
    b, t, hq, hd = q.shape
    g = hq // kv_heads
    return q.reshape(b, t, kv_heads, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, hd).astype(dtype)


def unfold_queries(out: jax.Array, num_queries: int) -> jax.Array:
    """:func:`fold_queries` undone: [B, Hkv, G*T, hd] -> [B, T, Hq, hd]."""
    b, hkv, rows, hd = out.shape
    g = rows // num_queries
    return out.reshape(b, hkv, g, num_queries, hd).transpose(0, 3, 1, 2, 4).reshape(b, num_queries, hkv * g, hd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention with GQA and no repeated KV heads.

    q: [B, T, Hq, hd]; k, v: [B, Hkv, S, hd]; mask: bool [B, T, S] (True = visible), or
    [B, Hkv, T, S] when visibility differs per KV head (TailorKV's per-head token selection).
    Returns float32 [B, T, Hq, hd]. Scores and softmax are float32 whatever the input dtype.

    Queries are folded (:func:`fold_queries`): contracting the unfolded [B, T, Hkv, G, hd] form
    instead made XLA:CPU pick layouts that transpose v on every call (decode at 8k was several
    times slower).
    """
    b, t, hq, hd = q.shape
    hkv = k.shape[1]
    scores = jnp.einsum("bhrd,bhsd->bhrs", fold_queries(q, hkv, k.dtype), k, preferred_element_type=jnp.float32) * hd**-0.5
    mask = mask[:, None, None] if mask.ndim == 3 else mask[:, :, None]  # [B, 1 or Hkv, 1, T, S]
    scores = jnp.where(mask, scores.reshape(b, hkv, hq // hkv, t, -1), MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).reshape(b, hkv, hq // hkv * t, -1)
    out = jnp.einsum("bhrs,bhsd->bhrd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return unfold_queries(out, t)


def causal_mask(batch: int, length: int) -> jax.Array:
    """bool [B, T, T]: query t sees keys 0..t."""
    mask = jnp.tril(jnp.ones((length, length), dtype=bool))
    return jnp.broadcast_to(mask, (batch, length, length))


def live_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, first_row: jax.Array, query_slots: jax.Array, *, window: int, block: int
) -> jax.Array:
    """Causal attention of R cache rows' queries over the live prefix of their rows only: the cost
    follows the longest query's position, not the cache's capacity.

    q [R, T, Hq, hd] belongs to rows ``first_row``..``first_row`` + R - 1 (int32 []) of k, v
    [N, Hkv, S, hd]; query_slots int32 [R, T] is each query's own slot, and it sees slots 0 through
    it. See :func:`attention_over_reads` for how the rows are read.
    """
    r, hkv, hd = q.shape[0], k.shape[1], k.shape[3]

    def read(start, size: int) -> tuple[jax.Array, jax.Array]:
        at = [jnp.asarray(i, jnp.int32) for i in (first_row, 0, start, 0)]
        return tuple(jax.lax.dynamic_slice(x, at, (r, hkv, size, hd)) for x in (k, v))

    return attention_over_reads(q, read, query_slots, capacity=k.shape[2], window=window, block=block)


def attention_over_reads(
    q: jax.Array, read, query_slots: jax.Array, *, capacity: int, window: int, block: int
) -> jax.Array:
    """:func:`live_attention` over rows that ``read(start, size)`` -> (k, v [R, Hkv, size, hd])
    fetches (from device memory, or from host memory for TailorKV's prompt stores).

    The first ``window`` slots are read as one static slice; the slots past it, in blocks of
    ``block`` under a loop whose trip count is data (the blocks that the largest query slot
    reaches), so one compilation serves every length. ``capacity`` - window must be a multiple of
    ``block`` (no block may overrun the rows). The parts meet in an online softmax (flash
    decoding): scores and sums float32, the result float32 [R, T, Hq, hd].
    """
    r, t, hq, hd = q.shape
    if (capacity - window) % block or window > capacity:
        raise ValueError(f"live_attention: capacity {capacity} must be window {window} + a multiple of block {block}")

    def scores(keys: jax.Array, start) -> jax.Array:  # [R, Hkv, G*T, size]
        hkv, size = keys.shape[1], keys.shape[2]
        s = jnp.einsum("bhrd,bhsd->bhrs", fold_queries(q, hkv, keys.dtype), keys, preferred_element_type=jnp.float32) * hd**-0.5
        visible = start + jnp.arange(size)[None, None, :] <= query_slots[:, :, None]  # [R, T, size]
        return jnp.where(visible[:, None, None], s.reshape(r, hkv, hq // hkv, t, size), MASKED_SCORE).reshape(s.shape)

    def weighted_values(p: jax.Array, values: jax.Array) -> jax.Array:
        return jnp.einsum("bhrs,bhsd->bhrd", p.astype(values.dtype), values, preferred_element_type=jnp.float32)

    keys, values = read(0, window)
    s = scores(keys, 0)  # slot 0 is visible to every query: the running max is a real score
    m = s.max(axis=-1)
    p = jnp.exp(s - m[..., None])

    def add_block(i, carry):
        m, total, out = carry
        start = window + i * block
        keys, values = read(start, block)
        s = scores(keys, start)
        m_new = jnp.maximum(m, s.max(axis=-1))
        scale = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        return m_new, total * scale + p.sum(axis=-1), out * scale[..., None] + weighted_values(p, values)

    carry = (m, p.sum(axis=-1), weighted_values(p, values))
    if window < capacity:
        blocks = jnp.maximum(0, jnp.max(query_slots) + 1 - window + block - 1) // block
        carry = jax.lax.fori_loop(0, blocks, add_block, carry)
    _, total, out = carry
    return unfold_queries(out / total[..., None], t)
