"""The packed format's bit order: codes round-trip through uint32 words along any axis."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import BITS, SEEDS

from dami_kernels.packing import pack_bits, unpack_bits


@functools.partial(jax.jit, static_argnames=("bits", "axis", "length"))
def pack_round_trip(codes, bits, axis, length):
    words = pack_bits(codes, bits, axis)
    return words, unpack_bits(words, bits, axis, length)


@settings(deadline=None, max_examples=15)
@given(bits=BITS, length=st.integers(0, 70), lead=st.integers(1, 3), axis=st.sampled_from([0, 1, -1]), seed=SEEDS)
def test_pack_unpack_round_trip(bits, length, lead, axis, seed):
    shape = [lead, 2, 2]
    shape[axis] = length
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=shape, dtype=np.uint8)
    words, back = pack_round_trip(jnp.asarray(codes), bits, axis, length)
    assert words.dtype == jnp.uint32
    assert words.shape[axis] == -(-length // (32 // bits))
    assert back.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(back), codes)


def test_pack_bit_order():
    # code i sits at bit offset bits * (i % (32 // bits)), little end first; the tail is zero.
    assert int(pack_bits(jnp.array([1, 2, 3]), 2)[0]) == 1 | 2 << 2 | 3 << 4
    words = pack_bits(jnp.ones(33, jnp.uint8), 1)
    assert [int(w) for w in words] == [0xFFFFFFFF, 1]
    assert int(pack_bits(jnp.array([15] * 8), 4)[0]) == 0xFFFFFFFF
