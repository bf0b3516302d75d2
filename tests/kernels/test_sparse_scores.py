"""Sparse-layer token scoring (Pallas, interpret mode) against the pure-jnp reference
:func:`dami_jax.tailorkv.cache.token_scores`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from hypothesis import given
from hypothesis import strategies as st
from kernel_cases import FEW, GQA, SEEDS, TOLERANCE, gaussian

from dami_jax.tailorkv import cache as reference
from dami_kernels.sparse_scores import MODES, token_scores


@functools.partial(jax.jit, static_argnames=("mode", "block"))
def kernel_and_reference(q_channels, kt, channels, mode, block):
    """Scores read from the transposed keys at ``channels``, from the gathered rows, and the
    reference on the gathered rows."""
    rows = jnp.take_along_axis(kt, channels[..., None], axis=2)
    kernel = functools.partial(token_scores, mode=mode, block=block, interpret=True)
    return (
        kernel(q_channels, kt, channels=channels),
        kernel(q_channels, rows),
        reference.token_scores(q_channels, rows, mode),
    )


@FEW
@given(
    seed=SEEDS,
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    gqa=GQA,
    num_channels=st.integers(1, 12),
    prompt=st.integers(1, 150),
    mode=st.sampled_from(MODES),
    block=st.sampled_from([16, 64]),
)
def test_matches_reference_reading_only_the_chosen_channels(
    seed, batch, kv_heads, gqa, num_channels, prompt, mode, block
):
    """Every channel of the transposed keys that is not chosen holds NaN: a kernel that let one
    into a score would fail. Prompt lengths off the block grid; channel counts off powers of two."""
    rng = np.random.default_rng(seed)
    head_dim = 16
    channels = np.stack(
        [np.stack([rng.choice(head_dim, num_channels, replace=False) for _ in range(kv_heads)]) for _ in range(batch)]
    )
    kt = np.array(gaussian(rng, (batch, kv_heads, head_dim, prompt)))
    chosen = np.zeros(kt.shape[:3], bool)
    np.put_along_axis(chosen, channels, True, axis=2)
    kt[~chosen] = np.nan
    q_channels = gaussian(rng, (batch, kv_heads, gqa, num_channels))
    from_keys, from_rows, ref = kernel_and_reference(
        q_channels, jnp.asarray(kt), jnp.asarray(channels, jnp.int32), mode, block
    )
    assert from_keys.shape == ref.shape == (batch, kv_heads, prompt) and from_keys.dtype == jnp.float32
    assert rel_err(from_keys, ref) <= TOLERANCE and rel_err(from_rows, ref) <= TOLERANCE


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="mode must be one of"):
        token_scores(jnp.zeros((1, 1, 2, 3)), jnp.zeros((1, 1, 3, 5)), "mean", interpret=True)
