"""GQA attention against a direct float64 reference (KV heads repeated, softmax over visible keys)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dami_jax.models.attention import attention


def reference(q, k, v, mask):
    """q [B, T, Hq, hd]; k, v [B, Hkv, S, hd]; mask [B, T, S] or [B, Hkv, T, S] -> [B, T, Hq, hd]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)  # [B, Hq, S, hd]
    mask = np.asarray(mask)
    mask = mask[:, None] if mask.ndim == 3 else np.repeat(mask, g, axis=1)  # [B, 1 or Hq, T, S]
    scores = np.einsum("bthd,bhsd->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhts,bhsd->bthd", probs, v)


@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("num_kv_heads, num_heads", [(1, 3), (2, 2), (2, 6)])
@pytest.mark.parametrize("per_head_mask", [False, True])
def test_attention_matches_reference(t, num_kv_heads, num_heads, per_head_mask):
    b, s, hd = 2, 11, 8
    keys = jax.random.split(jax.random.key(t * 100 + num_heads), 4)
    q = jax.random.normal(keys[0], (b, t, num_heads, hd))
    k = jax.random.normal(keys[1], (b, num_kv_heads, s, hd))
    v = jax.random.normal(keys[2], (b, num_kv_heads, s, hd))
    shape = (b, num_kv_heads, t, s) if per_head_mask else (b, t, s)
    mask = jax.random.bernoulli(keys[3], 0.6, shape).at[..., 0].set(True)  # every query row sees a key
    np.testing.assert_allclose(attention(q, k, v, mask), reference(q, k, v, mask), rtol=1e-5, atol=1e-5)
