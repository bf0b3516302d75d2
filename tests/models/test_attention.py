"""GQA attention against a direct float64 reference (KV heads repeated, softmax over visible keys)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dami_jax.models.attention import attention, live_attention


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


@pytest.mark.parametrize("window, block", [(16, 16), (40, 8), (96, 32), (8, 88)])
@pytest.mark.parametrize("num_kv_heads, num_heads, t", [(1, 3, 1), (2, 4, 1), (2, 6, 5)])
def test_live_attention_matches_reference_on_rows_of_very_different_lengths(window, block, num_kv_heads, num_heads, t):
    """Rows read only their live prefix, whatever the window/block split: against float64."""
    n, s, hd = 6, 96, 8
    keys = jax.random.split(jax.random.key(window + block + t), 3)
    k = jax.random.normal(keys[0], (n, num_kv_heads, s, hd))
    v = jax.random.normal(keys[1], (n, num_kv_heads, s, hd))
    first_row, rows = (1, 4) if t == 1 else (3, 2)
    last = np.asarray([0, 1, 63, 95, 17, 40])[:rows] if t == 1 else np.asarray([0, 90])
    query_slots = np.minimum(last[:, None] + np.arange(t)[None], s - 1).astype(np.int32)
    q = jax.random.normal(keys[2], (rows, t, num_heads, hd))
    out = live_attention(q, k, v, np.int32(first_row), query_slots, window=window, block=block)
    mask = np.arange(s)[None, None, :] <= query_slots[:, :, None]
    expected = reference(q, k[first_row : first_row + rows], v[first_row : first_row + rows], mask)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_live_attention_never_reads_past_the_longest_live_row():
    """NaNs past the blocks the longest row reaches cannot leak in (a read of them would: 0 * nan);
    the whole-cache reference, which reads them, turns to NaN."""
    n, hkv, s, hd = 3, 2, 64, 8
    k = jax.random.normal(jax.random.key(0), (n, hkv, s, hd))
    v = jax.random.normal(jax.random.key(1), (n, hkv, s, hd))
    query_slots = np.asarray([[3], [20], [9]], np.int32)  # the longest reaches slot 20: window 16 + one block of 8
    poisoned = v.at[:, :, 24:].set(np.nan)
    q = jax.random.normal(jax.random.key(2), (n, 1, 4, hd))
    out = live_attention(q, k, poisoned, np.int32(0), query_slots, window=16, block=8)
    mask = np.arange(s)[None, None, :] <= query_slots[:, :, None]
    np.testing.assert_allclose(out, reference(q, k, v, mask), rtol=1e-5, atol=1e-5)
    assert np.isnan(np.asarray(attention(q, k, poisoned, mask))).all()


def test_live_attention_refuses_a_capacity_its_blocks_would_overrun():
    k = np.zeros((1, 1, 50, 8), np.float32)
    with pytest.raises(ValueError, match="capacity 50 must be window 16 \\+ a multiple of block 16"):
        live_attention(np.zeros((1, 1, 1, 8), np.float32), k, k, np.int32(0), np.zeros((1, 1), np.int32), window=16, block=16)
