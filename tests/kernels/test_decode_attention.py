"""Full-precision decode attention (Pallas, interpret mode) against the reference
:func:`dami_jax.models.attention.attention` over the segments' concatenation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from conftest import rel_err
from hypothesis import given
from hypothesis import strategies as st
from kernel_cases import BLOCKS, FEW, GQA, SEEDS, TOLERANCE, gaussian

from dami_jax.models.attention import attention
from dami_kernels.decode_attention import decode_attention, segment_attention


@functools.partial(jax.jit, static_argnames=("block",))
def kernel_and_reference(q, segments, block):
    """segment_attention, and attention over the concatenated segments read in float32."""
    out = segment_attention(q, segments, block=block, interpret=True)
    b, hkv = segments[0][0].shape[:2]
    k, v = (jnp.concatenate([s[i].astype(jnp.float32) for s in segments], axis=2) for i in (0, 1))
    mask = jnp.concatenate([jnp.broadcast_to(s[2], (b, hkv, s[0].shape[2])) for s in segments], axis=-1)
    return out, attention(q, k, v, mask[:, :, None])


@FEW
@given(
    seed=SEEDS,
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    gqa=GQA,
    head_dim=st.sampled_from([16, 32]),
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    per_head=st.booleans(),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    block=BLOCKS,
)
def test_segments_match_attention_over_their_concatenation(
    seed, batch, kv_heads, gqa, head_dim, lengths, per_head, dtype, block
):
    """Lengths off the block grid, per-head or shared masks, rows all-visible, partly visible or
    all-masked (the reference's uniform average), bfloat16 K/V read exactly."""
    rng = np.random.default_rng(seed)
    q = gaussian(rng, (batch, 1, kv_heads * gqa, head_dim))
    density = rng.choice([0.0, 0.3, 1.0], size=(batch, 1, 1))
    segments = [
        (
            gaussian(rng, (batch, kv_heads, s, head_dim), dtype),
            gaussian(rng, (batch, kv_heads, s, head_dim), dtype),
            jnp.asarray(rng.random((batch, kv_heads if per_head else 1, s)) < density),
        )
        for s in lengths
    ]
    out, ref = kernel_and_reference(q, segments, block=block)
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert rel_err(out, ref) <= TOLERANCE


def test_decode_attention_takes_attentions_mask_layouts():
    """[B, 1, S] (every head) and [B, Hkv, 1, S] (per KV head), as ``attention`` does."""
    rng = np.random.default_rng(0)
    q, k, v = gaussian(rng, (2, 1, 6, 16)), gaussian(rng, (2, 2, 37, 16)), gaussian(rng, (2, 2, 37, 16))
    for shape in [(2, 1, 37), (2, 2, 1, 37)]:
        mask = jnp.asarray(rng.random(shape) < 0.5)
        out = jax.jit(functools.partial(decode_attention, block=16, interpret=True))(q, k, v, mask)
        assert rel_err(out, attention(q, k, v, mask)) <= TOLERANCE
