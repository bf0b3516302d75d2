"""KIVI-style low-bit KV quantization: asymmetric uniform codes, stored in the packed format
the kernels read (:mod:`dami_kernels.packing`: keys per channel over groups of tokens, values
per token over groups of channels, codes in uint32 words).

Rounding differs from the reference code (ydyhello/TailorKV, KIVI), which computes in float16:
here codes are computed in float32, and the stored float16 zero is rounded down and the scale up,
so the stored grid still covers [min, max] and every entry stays within scale/2. Codes differ
from the reference's on about 3e-4 (1-bit) to 4e-3 (4-bit) of entries; the mean error is equal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dami_kernels.packing import QuantizedKeys, QuantizedTensor, QuantizedValues


def _check_scale_dtype(scale_dtype) -> None:
    if not jnp.issubdtype(scale_dtype, jnp.floating):
        raise ValueError(f"scale_dtype must be a float dtype (float16, bfloat16, float32), got {scale_dtype!r}")


def _round_toward(x: jax.Array, dtype, up: bool) -> jax.Array:
    """Cast float32 ``x`` to ``dtype`` rounding up (or down), so the stored grid still covers
    [min, max] and the error bound scale/2 survives low-precision scales."""
    y = x.astype(dtype)
    wide = y.astype(jnp.float32)
    bad = wide < x if up else wide > x
    return jnp.where(bad, jnp.nextafter(y, jnp.array(jnp.inf if up else -jnp.inf, dtype)), y)


def _quantize(x: jax.Array, axis: int, bits: int, scale_dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Quantize float32 ``x`` over ``axis`` -> (uint8 codes like x, scale, zero without axis).

    zero = min (rounded down), scale = (max - zero) / (2**bits - 1) (rounded up); a constant
    group gets scale 0 and code 0, so it dequantizes to its exact value (if ``zero`` holds it).
    """
    levels = 2**bits - 1
    zero = _round_toward(x.min(axis), scale_dtype, up=False)
    scale = _round_toward((x.max(axis) - zero.astype(jnp.float32)) / levels, scale_dtype, up=True)
    s = jnp.expand_dims(scale.astype(jnp.float32), axis)
    z = jnp.expand_dims(zero.astype(jnp.float32), axis)
    codes = jnp.round((x - z) / jnp.where(s > 0, s, 1.0))
    return jnp.clip(codes, 0, levels).astype(jnp.uint8), scale, zero


def _quantize_store(store: type[QuantizedTensor], x: jax.Array, bits: int, group: int, scale_dtype):
    """x [B, Hkv, T, hd] -> ``store``, one (scale, zero) per group of ``group`` entries along its axis."""
    axis = store.axis
    store.check_grouping(bits, group, x.shape[axis])
    _check_scale_dtype(scale_dtype)
    n = x.shape[axis]
    grouped = x.astype(jnp.float32).reshape(*x.shape[:axis], n // group, group, *x.shape[axis + 1 :])
    codes, scale, zero = _quantize(grouped, axis + 1, bits, scale_dtype)
    return store.from_codes(codes.reshape(x.shape), scale, zero, bits, group)


def quantize_keys(k: jax.Array, bits: int, group: int, scale_dtype=jnp.float16) -> QuantizedKeys:
    """k [B, Hkv, T, hd] (T a multiple of ``group``) -> QuantizedKeys, per channel per token group."""
    return _quantize_store(QuantizedKeys, k, bits, group, scale_dtype)


def quantize_values(v: jax.Array, bits: int, group: int, scale_dtype=jnp.float16) -> QuantizedValues:
    """v [B, Hkv, T, hd] (any T; hd a multiple of ``group``) -> QuantizedValues, per token per channel group."""
    return _quantize_store(QuantizedValues, v, bits, group, scale_dtype)
