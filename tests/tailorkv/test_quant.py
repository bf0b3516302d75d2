"""KIVI-style quantization: error bounds, the stores, and quantized decode attention (the bit
packing itself: tests/kernels/test_packing.py)."""

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
from dami_jax.tailorkv.quant import quantize_keys, quantize_values
from dami_jax.tailorkv.quant_attention import quantized_attention
from dami_kernels.packing import QuantizedKeys, QuantizedValues, check_quant_config, pack_bits, unpack_bits

BITS = st.sampled_from([1, 2, 4])
SCALE_DTYPES = {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "float32": jnp.float32}
NP_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
SCALE_NAMES = st.sampled_from(sorted(SCALE_DTYPES))
SEEDS = st.integers(0, 2**31 - 1)
FEW = settings(deadline=None, max_examples=15)

# Everything runs under jit with few distinct shapes: a jit compile costs far less than eager
# dispatch compiling every primitive for every new shape.


@functools.partial(jax.jit, static_argnames=("bits", "group", "scale_dtype"))
def keys_round_trip(k, bits, group, scale_dtype):
    qk = quantize_keys(k, bits, group, scale_dtype)
    return qk, qk.dequantize(), qk.unpacked_codes()


@functools.partial(jax.jit, static_argnames=("bits", "group", "scale_dtype"))
def values_round_trip(v, bits, group, scale_dtype):
    qv = quantize_values(v, bits, group, scale_dtype)
    return qv, qv.dequantize(), qv.unpacked_codes()


@functools.partial(jax.jit, static_argnames=("bits", "scale_dtype", "k_group", "v_group"))
def attention_three_ways(q, k, v, k_res, v_res, mask_q, mask_r, bits, scale_dtype, k_group=8, v_group=4):
    """quantized_attention over k, v quantized in groups of ``k_group`` tokens (keys) and
    ``v_group`` channels (values); attention over the dequantized store + residual; attention over
    the exact k, v + residual. Then the stores."""
    keys, values = quantize_keys(k, bits, k_group, scale_dtype), quantize_values(v, bits, v_group, scale_dtype)
    out = quantized_attention(q, keys, values, k_res, v_res, mask_q, mask_r)
    mask = jnp.concatenate([mask_q, mask_r], axis=-1)
    keys_and = lambda store: jnp.concatenate([store, k_res], axis=2)  # noqa: E731
    values_and = lambda store: jnp.concatenate([store, v_res], axis=2)  # noqa: E731
    on_dequantized = attention(q, keys_and(keys.dequantize()), values_and(values.dequantize()), mask)
    return out, on_dequantized, attention(q, keys_and(k), values_and(v), mask), keys, values


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
    out, ref, *_ = attention_three_ways(*inputs, bits=bits, scale_dtype=SCALE_DTYPES[scale_name])
    q = inputs[0]
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert rel_err(out, ref) <= 1e-5


def attention_error_bound(q, k, v, k_res, v_res, mask_q, mask_r, k_scale, v_scale) -> np.ndarray:
    """A provable bound on |quantized - exact attention| per output entry, float64 [B, T, Hq, hd].

    One query head q (dimension d) over visible tokens s with logits z_s = q . k_s / sqrt(d) and
    weights p = softmax(z). Quantization moves each quantized key entry by at most half its
    group's scale, |khat_sc - k_sc| <= sk_sc / 2, and each value entry by |vhat_sc - v_sc| <=
    sv_sc / 2; residual tokens are exact. So each logit moves by at most

        eps_s = |q . (khat_s - k_s)| / sqrt(d) <= sum_c |q_c| sk_sc / (2 sqrt(d)),  eps = max_s eps_s.

    phat_s / p_s = exp(zhat_s - z_s) * sum_t exp(z_t) / sum_t exp(zhat_t) lies in [e^-2eps, e^2eps],
    hence sum_s |phat_s - p_s| <= min(e^2eps - 1, 2). In channel c, with lo_c, hi_c the range of
    the exact values over visible tokens and m_c its midpoint (sum_s (phat_s - p_s) = 0 lets any
    constant be subtracted from v):

        |ohat_c - o_c| = |sum_s phat_s (vhat_sc - v_sc) + sum_s (phat_s - p_s) (v_sc - m_c)|
                      <= max_s sv_sc / 2 + min(e^2eps - 1, 2) (hi_c - lo_c) / 2.

    Masked tokens have weight 0 on both sides, so the maxima run over visible tokens only.
    k_scale: [B, Hkv, S_q / k_group, hd] (keys' scales); v_scale: [B, Hkv, S_q, hd / v_group].
    """
    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    b, t, hq, hd = q.shape
    hkv, s_q = k.shape[1], k.shape[2]
    sk = np.repeat(f64(k_scale), s_q // k_scale.shape[2], axis=2)  # [B, Hkv, S_q, hd]
    sv = np.repeat(f64(v_scale), hd // v_scale.shape[3], axis=3)
    q_abs = np.abs(f64(q)).reshape(b, t, hkv, hq // hkv, hd)
    eps = np.einsum("btkgd,bksd->btkgs", q_abs, sk) / (2 * np.sqrt(hd))
    eps = np.where(mask_q[:, :, None, None], eps, 0.0).max(-1)  # [B, T, Hkv, G]
    quantized = np.asarray(mask_q)[:, :, None, :, None]  # [B, T, 1, S_q, 1]
    value_error = np.where(quantized, sv[:, None], 0.0).max(3) / 2  # [B, T, Hkv, hd]
    values = np.concatenate([f64(v), f64(v_res)], axis=2)[:, None]  # [B, 1, Hkv, S, hd]
    visible = np.concatenate([mask_q, mask_r], axis=-1)[:, :, None, :, None]
    spread = np.where(visible, values, -np.inf).max(3) - np.where(visible, values, np.inf).min(3)
    shift = np.minimum(np.expm1(2 * eps), 2.0)[..., None] * spread[:, :, :, None] / 2
    return (value_error[:, :, :, None] + shift).reshape(b, t, hq, hd)


@pytest.mark.usefixtures("highest_precision")
@settings(deadline=None, max_examples=12)
@given(
    bits=st.sampled_from([1, 2]),
    batch=st.integers(1, 2),
    hkv=st.integers(1, 2),
    rep=st.sampled_from([1, 2, 4]),
    hd=st.sampled_from([64, 128]),
    k_group=st.sampled_from([32, 64]),
    num_groups=st.integers(1, 3),
    v_group=st.sampled_from([32, 64]),
    t=st.integers(1, 2),
    s_r=st.sampled_from([0, 1, 17]),
    visible=st.sampled_from([0.03, 0.7]),
    log_eps=st.floats(-3, 0),
    scale_name=SCALE_NAMES,
    seed=SEEDS,
)
def test_quantized_attention_error_is_within_the_bound(
    bits, batch, hkv, rep, hd, k_group, num_groups, v_group, t, s_r, visible, log_eps, scale_name, seed
):
    """1- and 2-bit quantized attention vs exact attention, within :func:`attention_error_bound`;
    and equal to exact attention over the dequantized store. Sparse masks (``visible`` = 0.03,
    often a single token) make the bound nearly tight: the output is then that token's value."""
    s_q = k_group * num_groups
    rng = np.random.default_rng(seed)
    k, v = random_kv(seed, (batch, hkv, s_q, hd)), random_kv(seed + 1, (batch, hkv, s_q, hd))
    k_res, v_res = random_kv(seed + 2, (batch, hkv, s_r, hd)), random_kv(seed + 3, (batch, hkv, s_r, hd))
    # Queries sized so that the logit error bound eps is about 10**log_eps (the keys' mean step
    # standing in for every scale).
    k_step = np.ptp(k.reshape(batch, hkv, num_groups, k_group, hd), axis=3).mean() / (2**bits - 1)
    q = rng.normal(size=(batch, t, hkv * rep, hd))
    q = (q * 10**log_eps * 2 * np.sqrt(hd) / (hd * np.abs(q).mean() * k_step)).astype(np.float32)
    mask_q, mask_r = rng.random((batch, t, s_q)) < visible, rng.random((batch, t, s_r)) < visible
    mask_q[..., 0] = True  # at least one visible token per query
    out, on_dequantized, exact, keys, values = attention_three_ways(
        *map(jnp.asarray, (q, k, v, k_res, v_res, mask_q, mask_r)),
        bits=bits, scale_dtype=SCALE_DTYPES[scale_name], k_group=k_group, v_group=v_group,
    )  # fmt: skip
    assert rel_err(out, on_dequantized) <= 1e-5
    bound = attention_error_bound(q, k, v, k_res, v_res, mask_q, mask_r, keys.scale, values.scale)
    rounding = 1e-5 * np.abs(np.concatenate([v, v_res], axis=2)).max()  # float32 arithmetic on both sides
    excess = np.abs(np.asarray(out, np.float64) - np.asarray(exact, np.float64)) - (bound + rounding)
    assert excess.max() <= 0, f"error exceeds the bound by {excess.max()}"


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
