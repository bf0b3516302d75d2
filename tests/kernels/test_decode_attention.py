"""Full-precision decode attention (Pallas, interpret mode) against the reference
:func:`dami_jax.models.attention.attention` over the segments' concatenation, and, with per-row
lengths, against a float64 reference over the live slots (NaN past them: a kernel that read a
slot past its row's length would return NaN)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from hypothesis import given
from hypothesis import strategies as st
from kernel_cases import (
    BLOCKS,
    FEW,
    GQA,
    SEEDS,
    SPLITS,
    TOLERANCE,
    assert_matches_reference64,
    dense_reference64,
    dense_strategies,
    draw_dense_case,
    edge_case,
    gaussian,
    lengths_strategy,
    past,
    spare,
    reference64,
)

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


@functools.partial(jax.jit, static_argnames=("block", "splits"))
def decode_and_xla(q, k, v, lengths, block, splits):
    """The kernel, and the XLA path: ``attention`` with mask = slot < lengths[b] (on K/V read in
    float32, with the dead slots zeroed: it reads every slot)."""
    out = decode_attention(q, k, v, lengths, block=block, splits=splits, interpret=True)
    live = jnp.arange(k.shape[2])[None, :] < lengths[:, None]
    k, v = (jnp.where(live[:, None, :, None], x.astype(jnp.float32), 0) for x in (k, v))
    return out, attention(q, k, v, live[:, None, :])


def check_dense(q, k, v, lengths, block, splits, spare_rows: int = 0) -> None:
    """``spare_rows``: NaN rows past q's in the cache (the engine decodes slots 0..B-1 of more)."""
    reference = dense_reference64(q, k, v, lengths)
    if spare_rows:
        out = decode_attention(q, spare(k, spare_rows), spare(v, spare_rows), jnp.asarray(lengths), block=block,
                               splits=splits, interpret=True)  # fmt: skip
        return assert_matches_reference64(out, reference)
    out, xla = decode_and_xla(q, k, v, jnp.asarray(lengths), block=block, splits=splits)
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert_matches_reference64(out, reference)
    assert_matches_reference64(np.where(reference[1][:, None, None, None], xla, 0), reference)


@pytest.mark.parametrize("block, splits, gqa, spare_rows", [(16, 3, 4, 0), (64, 2, 17, 0), (32, 16, 1, 0), (16, 3, 4, 3)])
def test_decode_attention_reads_each_row_up_to_its_length(block, splits, gqa, spare_rows):
    """Rows of lengths 0 (an idle slot: zeros), 1, 63, 64, 65, S - 1 and S in one batch; the
    cache's rows past the batch never read."""
    check_dense(*edge_case(gqa), block, splits, spare_rows)


@FEW
@given(**dense_strategies())
def test_decode_attention_matches_float64_over_live_slots(
    seed, capacity, batch, kv_heads, gqa, head_dim, dtype, block, splits, data
):
    case = draw_dense_case(data, seed, capacity, batch, kv_heads, gqa, head_dim, dtype)
    check_dense(*case, block, splits)


@FEW
@given(
    seed=SEEDS,
    sizes=st.lists(st.integers(1, 90), min_size=1, max_size=3),
    gqa=GQA,
    masked=st.lists(st.booleans(), min_size=3, max_size=3),
    block=BLOCKS,
    splits=SPLITS,
    data=st.data(),
)
def test_segments_with_lengths_and_masks(seed, sizes, gqa, masked, block, splits, data):
    """Any segment takes per-row lengths, a mask, both or neither (as the sparse layers' window,
    top-k and generated tokens will); rows empty in some segments or all of them."""
    rng = np.random.default_rng(seed)
    batch, kv_heads, head_dim = 3, 2, 16
    q = gaussian(rng, (batch, 1, kv_heads * gqa, head_dim))
    segments = []
    for size, has_mask in zip(sizes, masked):
        lengths = data.draw(st.none() | lengths_strategy(size, batch), label="lengths")
        k, v = (gaussian(rng, (batch, kv_heads, size, head_dim)) for _ in range(2))
        if lengths is not None:
            k, v = past(lengths, k), past(lengths, v)
        mask = jnp.asarray(rng.random((batch, kv_heads, size)) < 0.6) if has_mask else None
        segments.append((jnp.asarray(k), jnp.asarray(v), mask, None if lengths is None else jnp.asarray(lengths)))
    out = jax.jit(functools.partial(segment_attention, block=block, splits=splits, interpret=True))(q, segments)
    assert_matches_reference64(out, reference64(q, segments))


def test_bad_lengths_and_splits_are_named():
    q, kv = jnp.zeros((2, 1, 2, 16)), jnp.zeros((2, 1, 40, 16))
    with pytest.raises(ValueError, match=r"lengths must be int32 \[B=2\]"):
        decode_attention(q, kv, kv, jnp.zeros((3,), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="splits must be a positive int"):
        decode_attention(q, kv, kv, jnp.zeros((2,), jnp.int32), splits=0, interpret=True)

