"""KIVI-style low-bit KV quantization: asymmetric uniform codes packed into uint32 words.

Keys are quantized per channel over groups of ``group`` tokens (outlier channels keep their own
range), values per token over groups of ``group`` channels, as in KIVI and TailorKV. Both stores
keep the cache's ``[B, Hkv, tokens, hd]`` order, so decode attention reads them like a dense
cache, and whole groups (keys) or single tokens (values) are written with one
``dynamic_update_slice`` (see ``QuantizedKeys.update`` / ``QuantizedValues.update``).

Bit order: code ``i`` along the packed axis sits in word ``i // (32 // bits)`` at bit offset
``bits * (i % (32 // bits))`` (little end first).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

BIT_WIDTHS = (1, 2, 4)


def check_quant_config(bits: int, group: int, head_dim: int) -> None:
    """Raise ValueError (naming the argument) unless ``bits``/``group`` suit ``head_dim``.

    ``group`` is checked as a value group: it must divide ``head_dim``.
    """
    _check_bits_group(bits, group)
    if head_dim <= 0 or head_dim % group:
        raise ValueError(f"group={group} must divide head_dim={head_dim} (values are grouped along channels)")


def _check_scale_dtype(scale_dtype) -> None:
    if not jnp.issubdtype(scale_dtype, jnp.floating):
        raise ValueError(f"scale_dtype must be a float dtype (float16, bfloat16, float32), got {scale_dtype!r}")


def _check_bits_group(bits: int, group: int) -> None:
    if bits not in BIT_WIDTHS:
        raise ValueError(f"bits must be one of {BIT_WIDTHS}, got bits={bits!r}")
    if not isinstance(group, int) or group <= 0:
        raise ValueError(f"group must be a positive int, got group={group!r}")


def codes_per_word(bits: int) -> int:
    """How many ``bits``-bit codes one uint32 word holds."""
    _check_bits_group(bits, 1)
    return 32 // bits


# --------------------------------------------------------------------------- bit packing


def pack_bits(codes: jax.Array, bits: int, axis: int = -1) -> jax.Array:
    """Pack integer codes in [0, 2**bits) into uint32 words along ``axis``.

    codes [..., n, ...] -> uint32 [..., ceil(n / (32 // bits)), ...]; the tail is zero-padded.
    Bits above ``bits`` are dropped, so a bad code cannot corrupt its neighbours.
    """
    per = codes_per_word(bits)
    x = jnp.moveaxis(codes, axis, -1).astype(jnp.uint32) & jnp.uint32(2**bits - 1)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -x.shape[-1] % per)])
    x = x.reshape(*x.shape[:-1], -1, per)
    shifts = jnp.arange(per, dtype=jnp.uint32) * jnp.uint32(bits)
    words = jnp.sum(x << shifts, axis=-1, dtype=jnp.uint32)  # disjoint bit fields: sum == or
    return jnp.moveaxis(words, -1, axis)


def unpack_bits(words: jax.Array, bits: int, axis: int, length: int) -> jax.Array:
    """Inverse of ``pack_bits``: uint32 [..., W, ...] -> uint8 codes [..., length, ...]."""
    per = codes_per_word(bits)
    if not 0 <= length <= words.shape[axis] * per:
        raise ValueError(f"length={length} does not fit in {words.shape[axis]} words of {per} codes")
    x = jnp.moveaxis(words, axis, -1).astype(jnp.uint32)
    shifts = jnp.arange(per, dtype=jnp.uint32) * jnp.uint32(bits)
    codes = (x[..., None] >> shifts) & jnp.uint32(2**bits - 1)
    codes = codes.reshape(*x.shape[:-1], -1)[..., :length].astype(jnp.uint8)
    return jnp.moveaxis(codes, -1, axis)


# --------------------------------------------------------------------------- quantization


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


@flax.struct.dataclass
class QuantizedKeys:
    """Keys quantized per channel over groups of ``group`` tokens.

    codes: uint32 [B, Hkv, ceil(S / (32 // bits)), hd], packed along tokens (channels stay
        the fastest axis, like a dense [B, Hkv, S, hd] cache);
    scale, zero: scale_dtype [B, Hkv, S // group, hd], one pair per channel per token group.
    """

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array
    bits: int = flax.struct.field(pytree_node=False)
    group: int = flax.struct.field(pytree_node=False)

    @property
    def num_tokens(self) -> int:
        return self.scale.shape[2] * self.group

    @property
    def head_dim(self) -> int:
        return self.codes.shape[3]

    def unpacked_codes(self) -> jax.Array:
        """uint8 [B, Hkv, S // group, group, hd]."""
        codes = unpack_bits(self.codes, self.bits, axis=2, length=self.num_tokens)
        b, h, _, d = codes.shape
        return codes.reshape(b, h, -1, self.group, d)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """[B, Hkv, S, hd] in ``dtype`` (computed in float32)."""
        codes = self.unpacked_codes().astype(jnp.float32)
        x = codes * self.scale[:, :, :, None].astype(jnp.float32) + self.zero[:, :, :, None].astype(jnp.float32)
        return x.reshape(*x.shape[:2], -1, x.shape[-1]).astype(dtype)

    @classmethod
    def zeros(
        cls, batch: int, heads: int, tokens: int, head_dim: int, bits: int, group: int, scale_dtype=jnp.float16
    ) -> "QuantizedKeys":
        """An all-zero store of ``tokens`` slots (a multiple of ``group``), to preallocate a cache."""
        _check_bits_group(bits, group)
        if tokens % group:
            raise ValueError(f"tokens={tokens} must be a multiple of group={group}")
        words = -(-tokens // codes_per_word(bits))
        scales = jnp.zeros((batch, heads, tokens // group, head_dim), scale_dtype)
        return cls(jnp.zeros((batch, heads, words, head_dim), jnp.uint32), scales, scales, bits=bits, group=group)

    def update(self, new: "QuantizedKeys", start: jax.Array | int) -> "QuantizedKeys":
        """Write ``new`` at token ``start`` (a multiple of ``group``; may be traced).

        Needs ``group`` to be a multiple of ``32 // bits`` so that groups start on word
        boundaries (true for group 64 and every bit width).
        """
        _check_same(self, new)
        per = codes_per_word(self.bits)
        if self.group % per:
            raise ValueError(f"group={self.group} must be a multiple of {per} to append {self.bits}-bit key groups")
        word, grp = start // per, start // self.group
        return self.replace(
            codes=jax.lax.dynamic_update_slice(self.codes, new.codes, (0, 0, word, 0)),
            scale=jax.lax.dynamic_update_slice(self.scale, new.scale.astype(self.scale.dtype), (0, 0, grp, 0)),
            zero=jax.lax.dynamic_update_slice(self.zero, new.zero.astype(self.zero.dtype), (0, 0, grp, 0)),
        )


@flax.struct.dataclass
class QuantizedValues:
    """Values quantized per token over groups of ``group`` channels.

    codes: uint32 [B, Hkv, S, ceil(hd / (32 // bits))], packed along channels (one row per
        token, so tokens are appended one at a time);
    scale, zero: scale_dtype [B, Hkv, S, hd // group], one pair per token per channel group.
    """

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array
    bits: int = flax.struct.field(pytree_node=False)
    group: int = flax.struct.field(pytree_node=False)

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[2]

    @property
    def head_dim(self) -> int:
        return self.scale.shape[3] * self.group

    def unpacked_codes(self) -> jax.Array:
        """uint8 [B, Hkv, S, hd // group, group]."""
        codes = unpack_bits(self.codes, self.bits, axis=3, length=self.head_dim)
        return codes.reshape(*codes.shape[:3], -1, self.group)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """[B, Hkv, S, hd] in ``dtype`` (computed in float32)."""
        codes = self.unpacked_codes().astype(jnp.float32)
        x = codes * self.scale[..., None].astype(jnp.float32) + self.zero[..., None].astype(jnp.float32)
        return x.reshape(*x.shape[:3], -1).astype(dtype)

    @classmethod
    def zeros(
        cls, batch: int, heads: int, tokens: int, head_dim: int, bits: int, group: int, scale_dtype=jnp.float16
    ) -> "QuantizedValues":
        """An all-zero store of ``tokens`` slots, to preallocate a cache."""
        check_quant_config(bits, group, head_dim)
        words = -(-head_dim // codes_per_word(bits))
        scales = jnp.zeros((batch, heads, tokens, head_dim // group), scale_dtype)
        return cls(jnp.zeros((batch, heads, tokens, words), jnp.uint32), scales, scales, bits=bits, group=group)

    def update(self, new: "QuantizedValues", start: jax.Array | int) -> "QuantizedValues":
        """Write ``new`` (any number of tokens) at token ``start`` (may be traced)."""
        _check_same(self, new)
        at = (0, 0, start, 0)
        return self.replace(
            codes=jax.lax.dynamic_update_slice(self.codes, new.codes, at),
            scale=jax.lax.dynamic_update_slice(self.scale, new.scale.astype(self.scale.dtype), at),
            zero=jax.lax.dynamic_update_slice(self.zero, new.zero.astype(self.zero.dtype), at),
        )


def _check_same(store, new) -> None:
    if (store.bits, store.group, store.head_dim) != (new.bits, new.group, new.head_dim):
        raise ValueError(
            f"new: (bits, group, head_dim)={(new.bits, new.group, new.head_dim)} does not match the "
            f"store's {(store.bits, store.group, store.head_dim)}"
        )


def quantize_keys(k: jax.Array, bits: int, group: int, scale_dtype=jnp.float16) -> QuantizedKeys:
    """k [B, Hkv, T, hd] (T a multiple of ``group``) -> QuantizedKeys, per channel per token group."""
    _check_bits_group(bits, group)
    _check_scale_dtype(scale_dtype)
    b, h, t, d = k.shape
    if t % group:
        raise ValueError(f"group: key length T={t} must be a multiple of group={group} (whole groups are quantized)")
    x = k.astype(jnp.float32).reshape(b, h, t // group, group, d)
    codes, scale, zero = _quantize(x, 3, bits, scale_dtype)
    return QuantizedKeys(pack_bits(codes.reshape(b, h, t, d), bits, axis=2), scale, zero, bits=bits, group=group)


def quantize_values(v: jax.Array, bits: int, group: int, scale_dtype=jnp.float16) -> QuantizedValues:
    """v [B, Hkv, T, hd] (any T; hd a multiple of ``group``) -> QuantizedValues, per token per channel group."""
    b, h, t, d = v.shape
    check_quant_config(bits, group, d)
    _check_scale_dtype(scale_dtype)
    x = v.astype(jnp.float32).reshape(b, h, t, d // group, group)
    codes, scale, zero = _quantize(x, 4, bits, scale_dtype)
    return QuantizedValues(pack_bits(codes.reshape(b, h, t, d), bits, axis=3), scale, zero, bits=bits, group=group)
