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
    """
    b, t, hq, hd = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, t, hkv, hq // hkv, hd).astype(k.dtype)
    scores = jnp.einsum("bthgd,bhsd->bhgts", qg, k, preferred_element_type=jnp.float32) * hd**-0.5
    mask = mask[:, None, None] if mask.ndim == 3 else mask[:, :, None]
    scores = jnp.where(mask, scores, MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgts,bhsd->bthgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, hd)


def causal_mask(batch: int, length: int) -> jax.Array:
    """bool [B, T, T]: query t sees keys 0..t."""
    mask = jnp.tril(jnp.ones((length, length), dtype=bool))
    return jnp.broadcast_to(mask, (batch, length, length))
