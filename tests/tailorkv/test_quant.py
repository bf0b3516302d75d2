"""KIVI-style quantization primitives: packing, error bounds, and quantized decode attention."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from dami_jax.models.attention import attention
from dami_jax.tailorkv.quant import (
    QuantizedKeys,
    QuantizedValues,
    check_quant_config,
    pack_bits,
    quantize_keys,
    quantize_values,
    unpack_bits,
)
from dami_jax.tailorkv.quant_attention import quantized_attention

BITS = st.sampled_from([1, 2, 4])
SCALE_DTYPES = {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "float32": jnp.float32}
NP_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
SCALE_NAMES = st.sampled_from(sorted(SCALE_DTYPES))
SEEDS = st.integers(0, 2**31 - 1)
FEW = settings(deadline=None, max_examples=15)

# Everything runs under jit with few distinct shapes: a jit compile costs far less than eager
# dispatch compiling every primitive for every new shape.


@functools.partial(jax.jit, static_argnames=("bits", "axis", "length"))
def pack_round_trip(codes, bits, axis, length):
    words = pack_bits(codes, bits, axis)
    return words, unpack_bits(words, bits, axis, length)


@functools.partial(jax.jit, static_argnames=("bits", "group", "scale_dtype"))
def keys_round_trip(k, bits, group, scale_dtype):
    qk = quantize_keys(k, bits, group, scale_dtype)
    return qk, qk.dequantize(), qk.unpacked_codes()


@functools.partial(jax.jit, static_argnames=("bits", "group", "scale_dtype"))
def values_round_trip(v, bits, group, scale_dtype):
    qv = quantize_values(v, bits, group, scale_dtype)
    return qv, qv.dequantize(), qv.unpacked_codes()


@functools.partial(jax.jit, static_argnames=("bits", "scale_dtype"))
def quantized_and_reference(q, k, v, k_res, v_res, mask_q, mask_r, bits, scale_dtype):
    """quantized_attention (key groups of 8 tokens, value groups of 4 channels), and attention
    over the dequantized store + residual."""
    keys, values = quantize_keys(k, bits, 8, scale_dtype), quantize_values(v, bits, 4, scale_dtype)
    out = quantized_attention(q, keys, values, k_res, v_res, mask_q, mask_r)
    k = jnp.concatenate([keys.dequantize(), k_res], axis=2)
    v = jnp.concatenate([values.dequantize(), v_res], axis=2)
    return out, attention(q, k, v, jnp.concatenate([mask_q, mask_r], axis=-1))


def random_kv(seed: int, shape, representable=None) -> np.ndarray:
    """Gaussian data with a random per-tensor magnitude and offset (float32).

    ``representable``: round through this numpy dtype first, so that group minima are exact.
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 10.0 ** rng.uniform(-2, 2) + rng.uniform(-5, 5)
    if representable is not None:
        x = x.astype(representable)
    return x.astype(np.float32)


def within_half_scale(x: np.ndarray, deq: np.ndarray, scale: np.ndarray) -> None:
    """|x - deq| <= scale / 2 per element, plus float32 rounding of the arithmetic."""
    tol = 4 * np.finfo(np.float32).eps * (np.abs(x) + np.abs(deq) + 1e-30)
    excess = np.abs(x - deq) - (scale / 2 + tol)
    assert excess.max() <= 0, f"error exceeds scale/2 by {excess.max()}"


# --------------------------------------------------------------------------- packing


@FEW
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


# --------------------------------------------------------------------------- quantization


@FEW
@given(
    bits=BITS,
    group=st.sampled_from([1, 4, 16]),
    num_groups=st.integers(1, 2),
    hd=st.sampled_from([3, 8]),
    scale_name=SCALE_NAMES,
    seed=SEEDS,
)
def test_keys_error_bound_and_shapes(bits, group, num_groups, hd, scale_name, seed):
    k = random_kv(seed, (2, 2, group * num_groups, hd))
    qk, deq, _ = keys_round_trip(jnp.asarray(k), bits, group, SCALE_DTYPES[scale_name])
    assert qk.codes.shape == (2, 2, -(-group * num_groups // (32 // bits)), hd) and qk.codes.dtype == jnp.uint32
    assert qk.scale.shape == qk.zero.shape == (2, 2, num_groups, hd)
    assert qk.scale.dtype == qk.zero.dtype == SCALE_DTYPES[scale_name]
    assert (qk.num_tokens, qk.head_dim) == (group * num_groups, hd)
    deq = np.asarray(deq)
    assert deq.shape == k.shape and deq.dtype == np.float32
    scale = np.repeat(np.asarray(qk.scale, np.float32), group, axis=2)
    within_half_scale(k, deq, scale)


@FEW
@given(
    bits=BITS,
    group=st.sampled_from([1, 4, 8]),
    num_groups=st.integers(1, 2),
    tokens=st.sampled_from([1, 5, 12]),
    scale_name=SCALE_NAMES,
    seed=SEEDS,
)
def test_values_error_bound_and_shapes(bits, group, num_groups, tokens, scale_name, seed):
    hd = group * num_groups
    v = random_kv(seed, (1, 3, tokens, hd))
    qv, deq, _ = values_round_trip(jnp.asarray(v), bits, group, SCALE_DTYPES[scale_name])
    assert qv.codes.shape == (1, 3, tokens, -(-hd // (32 // bits))) and qv.codes.dtype == jnp.uint32
    assert qv.scale.shape == qv.zero.shape == (1, 3, tokens, num_groups)
    assert qv.scale.dtype == qv.zero.dtype == SCALE_DTYPES[scale_name]
    assert (qv.num_tokens, qv.head_dim) == (tokens, hd)
    deq = np.asarray(deq)
    assert deq.shape == v.shape and deq.dtype == np.float32
    scale = np.repeat(np.asarray(qv.scale, np.float32), group, axis=3)
    within_half_scale(v, deq, scale)


def test_default_scale_dtype_is_float16():
    x = jax.ShapeDtypeStruct((1, 1, 4, 4), jnp.float32)
    assert jax.eval_shape(lambda x: quantize_keys(x, 2, 4), x).scale.dtype == jnp.float16
    assert jax.eval_shape(lambda x: quantize_values(x, 2, 4), x).zero.dtype == jnp.float16


@FEW
@given(bits=BITS, scale_name=SCALE_NAMES, seed=SEEDS)
def test_constant_groups_are_exact(bits, scale_name, seed):
    """Constant groups (values the scale dtype can hold) round-trip exactly; others still bounded."""
    rng = np.random.default_rng(seed)
    group, hd = 4, 8
    x = random_kv(seed, (2, 1, 3 * group, hd), representable=NP_DTYPES[scale_name])
    # Keys: make a random subset of (token group, channel) blocks constant.
    k = x.reshape(2, 1, 3, group, hd).copy()
    const = rng.random((2, 1, 3, 1, hd)) < 0.5
    k = np.where(const, k[:, :, :, :1], k).reshape(x.shape)
    deq = np.asarray(keys_round_trip(jnp.asarray(k), bits, group, SCALE_DTYPES[scale_name])[1])
    const_k = np.broadcast_to(const, (2, 1, 3, group, hd)).reshape(x.shape)
    np.testing.assert_array_equal(deq[const_k], k[const_k])
    # Values: a random subset of (token, channel group) blocks constant.
    v = x.reshape(2, 1, 3 * group, hd // group, group).copy()
    const = rng.random((2, 1, 3 * group, hd // group, 1)) < 0.5
    v = np.where(const, v[..., :1], v).reshape(x.shape)
    deq = np.asarray(values_round_trip(jnp.asarray(v), bits, group, SCALE_DTYPES[scale_name])[1])
    const_v = np.broadcast_to(const, (2, 1, 3 * group, hd // group, group)).reshape(x.shape)
    np.testing.assert_array_equal(deq[const_v], v[const_v])


@FEW
@given(bits=BITS, scale_name=st.sampled_from(["float16", "bfloat16"]), seed=SEEDS)
def test_group_extremes_hit_end_codes(bits, scale_name, seed):
    """Each group's min gets code 0 and its max code 2**bits - 1: 1-bit codes use both levels."""
    group, hd = 8, 8
    x = random_kv(seed, (1, 2, 2 * group, hd), representable=NP_DTYPES[scale_name])
    codes = np.asarray(keys_round_trip(jnp.asarray(x), bits, group, SCALE_DTYPES[scale_name])[2])
    xg = x.reshape(codes.shape)
    nonconst = xg.max(3) > xg.min(3)
    assert np.all(np.take_along_axis(codes, xg.argmin(3)[:, :, :, None], 3)[:, :, :, 0] == 0)
    assert np.all(np.take_along_axis(codes, xg.argmax(3)[:, :, :, None], 3)[:, :, :, 0][nonconst] == 2**bits - 1)
    codes = np.asarray(values_round_trip(jnp.asarray(x), bits, group, SCALE_DTYPES[scale_name])[2])
    xg = x.reshape(codes.shape)
    nonconst = xg.max(4) > xg.min(4)
    assert np.all(np.take_along_axis(codes, xg.argmin(4)[..., None], 4)[..., 0] == 0)
    assert np.all(np.take_along_axis(codes, xg.argmax(4)[..., None], 4)[..., 0][nonconst] == 2**bits - 1)
    if bits == 1:
        assert set(np.unique(codes)) == {0, 1}


# --------------------------------------------------------------------------- stores


def test_stores_are_pytrees_and_update_under_jit():
    group, hd, bits = 16, 8, 2
    k_new = jnp.asarray(random_kv(1, (2, 2, group, hd)))
    v_new = jnp.asarray(random_kv(2, (2, 2, 1, hd)))

    @jax.jit
    def write(slot):
        keys = QuantizedKeys.zeros(2, 2, 4 * group, hd, bits, group)
        values = QuantizedValues.zeros(2, 2, 4 * group, hd, bits, group=4)
        new_k, new_v = quantize_keys(k_new, bits, group), quantize_values(v_new, bits, 4)
        keys = keys.update(new_k, slot * group)
        values = values.update(new_v, slot)
        return keys, values, new_k.dequantize(), new_v.dequantize()

    keys, values, want_k, want_v = write(jnp.int32(2))
    assert len(jax.tree.leaves(keys)) == 3 and len(jax.tree.leaves(values)) == 3
    deq_k, deq_v = jax.jit(lambda a, b: (a.dequantize(), b.dequantize()))(keys, values)
    deq_k, deq_v = np.asarray(deq_k), np.asarray(deq_v)
    np.testing.assert_array_equal(deq_k[:, :, 2 * group : 3 * group], want_k)
    np.testing.assert_array_equal(np.delete(deq_k, np.s_[2 * group : 3 * group], axis=2), 0)
    np.testing.assert_array_equal(deq_v[:, :, 2:3], want_v)
    np.testing.assert_array_equal(np.delete(deq_v, 2, axis=2), 0)


# --------------------------------------------------------------------------- attention


def attention_inputs(seed, b, t, hkv, rep, hd, s_q, s_r):
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    q, k, v = f32(b, t, hkv * rep, hd), f32(b, hkv, s_q, hd), f32(b, hkv, s_q, hd)
    k_res, v_res = f32(b, hkv, s_r, hd), f32(b, hkv, s_r, hd)
    mask_q = jnp.asarray(rng.random((b, t, s_q)) < 0.7)
    mask_r = jnp.asarray(rng.random((b, t, s_r)) < 0.7)
    return q, k, v, k_res, v_res, mask_q, mask_r


@pytest.mark.usefixtures("highest_precision")
@settings(deadline=None, max_examples=12)
@given(
    bits=BITS,
    rep=st.sampled_from([1, 2, 3]),
    t=st.integers(1, 2),
    num_groups=st.integers(1, 2),
    s_r=st.sampled_from([0, 3]),
    scale_name=SCALE_NAMES,
    seed=SEEDS,
)
def test_quantized_attention_matches_dequantized_reference(bits, rep, t, num_groups, s_r, scale_name, seed):
    inputs = attention_inputs(seed, 2, t, 2, rep, 16, 8 * num_groups, s_r)
    out, ref = quantized_and_reference(*inputs, bits=bits, scale_dtype=SCALE_DTYPES[scale_name])
    q = inputs[0]
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.usefixtures("highest_precision")
@pytest.mark.parametrize("bits, tol", [(2, 0.6), (4, 0.15)])
def test_quantized_attention_close_to_full_precision(bits, tol):
    """Sanity on random data with peaked attention (each query head follows one key)."""
    b, hkv, rep, hd, s_q, s_r = 2, 2, 2, 64, 128, 16
    _, k, v, k_res, v_res, _, _ = attention_inputs(0, b, 1, hkv, rep, hd, s_q, s_r)
    rng = np.random.default_rng(1)
    target = k[:, :, rng.integers(0, s_q, size=rep)]  # [B, Hkv, rep, hd]
    q = (0.5 * target + 0.3 * rng.normal(size=target.shape)).reshape(b, 1, hkv * rep, hd).astype(jnp.float32)
    mask_q, mask_r = jnp.ones((b, 1, s_q), bool), jnp.ones((b, 1, s_r), bool)

    @jax.jit
    def both(q, k, v, k_res, v_res):
        mask = jnp.concatenate([mask_q, mask_r], -1)
        full = attention(q, jnp.concatenate([k, k_res], 2), jnp.concatenate([v, v_res], 2), mask)
        keys, values = quantize_keys(k, bits, 64), quantize_values(v, bits, 32)
        return quantized_attention(q, keys, values, k_res, v_res, mask_q, mask_r), full

    out, full = both(q, k, v, k_res, v_res)
    assert float(jnp.linalg.norm(out - full) / jnp.linalg.norm(full)) < tol


# --------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: check_quant_config(3, 64, 128), "bits"),
        (lambda: check_quant_config(8, 64, 128), "bits"),
        (lambda: check_quant_config(2, 0, 128), "group"),
        (lambda: check_quant_config(2, -4, 128), "group"),
        (lambda: check_quant_config(2, 48, 128), "group"),
        (lambda: quantize_keys(jnp.zeros((1, 1, 100, 8)), 2, 64), "group"),
        (lambda: quantize_keys(jnp.zeros((1, 1, 64, 8)), 3, 64), "bits"),
        (lambda: quantize_values(jnp.zeros((1, 1, 5, 96)), 2, 64), "group"),
        (lambda: quantize_values(jnp.zeros((1, 1, 5, 64)), 2, 64, jnp.int8), "scale_dtype"),
        (lambda: pack_bits(jnp.zeros(4, jnp.uint8), 3), "bits"),
        (lambda: unpack_bits(jnp.zeros(2, jnp.uint32), 2, 0, 33), "length"),
        # 1-bit words hold 32 tokens: groups of 8 keys cannot be appended word-aligned.
        (lambda: QuantizedKeys.zeros(1, 1, 8, 8, 1, 8).update(QuantizedKeys.zeros(1, 1, 8, 8, 1, 8), 0), "group"),
    ],
)
def test_bad_configs_raise(call, name):
    with pytest.raises(ValueError, match=name):
        jax.eval_shape(call)  # errors are raised while tracing; nothing is computed


def test_valid_config_passes():
    for bits in (1, 2, 4):
        check_quant_config(bits, 64, 128)
