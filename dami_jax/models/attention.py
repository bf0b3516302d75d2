"""Grouped-query attention core (pure jnp), shared by every cache (dense, quantized, offloaded)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so that a query row with no visible key (a left-padding slot) yields a harmless
# uniform average instead of NaNs that would leak through later reductions.
MASKED_SCORE = -1e30


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention with GQA and no repeated KV heads.

    q: [B, T, Hq, hd]; k, v: [B, Hkv, S, hd]; mask: bool [B, T, S] (True = visible), or
    [B, Hkv, T, S] when visibility differs per KV head (TailorKV's per-head token selection).
    Returns float32 [B, T, Hq, hd]. Scores and softmax are float32 whatever the input dtype.

    The G = Hq / Hkv query heads sharing a KV head and the T positions are folded into G*T
    query rows, so both products are plain batched matmuls over (B, Hkv) that read k and v as
    stored ([G*T, hd] x [S, hd]^T, then [G*T, S] x [S, hd]). Contracting the unfolded
    [B, T, Hkv, G, hd] form instead made XLA:CPU pick layouts that transpose v on every call
    (decode at 8k was several times slower).
    """
    b, t, hq, hd = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    rows = q.reshape(b, t, hkv, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * t, hd).astype(k.dtype)
    scores = jnp.einsum("bhrd,bhsd->bhrs", rows, k, preferred_element_type=jnp.float32) * hd**-0.5
    mask = mask[:, None, None] if mask.ndim == 3 else mask[:, :, None]  # [B, 1 or Hkv, 1, T, S]
    scores = jnp.where(mask, scores.reshape(b, hkv, g, t, -1), MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).reshape(b, hkv, g * t, -1)
    out = jnp.einsum("bhrs,bhsd->bhrd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, hkv, g, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, hq, hd)


def causal_mask(batch: int, length: int) -> jax.Array:
    """bool [B, T, T]: query t sees keys 0..t."""
    mask = jnp.tril(jnp.ones((length, length), dtype=bool))
    return jnp.broadcast_to(mask, (batch, length, length))
