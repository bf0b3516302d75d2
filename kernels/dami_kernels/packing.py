"""The packed KV format the kernels read: KIVI codes in uint32 words, with a scale and a zero per
group of entries.

Keys are quantized per channel over groups of ``group`` tokens (outlier channels keep their own
range), values per token over groups of ``group`` channels, as in KIVI and TailorKV. Both stores
keep the cache's ``[B, Hkv, tokens, hd]`` order, so decode attention reads them like a dense
cache, and whole groups (keys) or single tokens (values) are written with one
``dynamic_update_slice`` (see ``QuantizedKeys.update`` / ``QuantizedValues.update``).

Bit order: code ``i`` along the packed axis sits in word ``i // (32 // bits)`` at bit offset
``bits * (i % (32 // bits))`` (little end first).

The format lives with the kernels, below the caches that fill it: how codes are computed
(rounding, scale dtypes) is :mod:`dami_jax.tailorkv.quant`'s concern.
"""

from __future__ import annotations

from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp

BIT_WIDTHS = (1, 2, 4)
TOKENS, CHANNELS = 2, 3  # axes of a [B, Hkv, S, hd] cache tensor


def check_bits_group(bits: int, group: int) -> None:
    if bits not in BIT_WIDTHS:
        raise ValueError(f"bits must be one of {BIT_WIDTHS}, got bits={bits!r}")
    if not isinstance(group, int) or group <= 0:
        raise ValueError(f"group must be a positive int, got group={group!r}")


def codes_per_word(bits: int) -> int:
    """How many ``bits``-bit codes one uint32 word holds."""
    check_bits_group(bits, 1)
    return 32 // bits


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


def _write_tokens(x: jax.Array, y: jax.Array, at: jax.Array | int) -> jax.Array:
    """``y`` [B, Hkv, n, d] written into ``x`` [B, Hkv, N, d] at token ``at``: a scalar, or int32
    [B] with one offset per row (rows whose tokens start at different slots)."""
    y = y.astype(x.dtype)
    if jnp.ndim(at) == 0:
        return jax.lax.dynamic_update_slice(x, y, (0, 0, at, 0))
    return jax.vmap(lambda row, new, a: jax.lax.dynamic_update_slice(row, new, (0, a, 0)))(x, y, at)


@flax.struct.dataclass
class QuantizedTensor:
    """A [B, Hkv, S, hd] cache tensor as KIVI codes, quantized over groups of ``group`` entries
    along ``axis`` and packed into uint32 words along that same axis.

    codes: uint32, the tensor's shape with ``axis`` packed to ceil(n / (32 // bits)) words;
    scale, zero: a float dtype, the tensor's shape with ``axis`` reduced to n // group groups.
    Subclasses fix ``axis``: :class:`QuantizedKeys` (tokens) and :class:`QuantizedValues` (channels).
    """

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array
    bits: int = flax.struct.field(pytree_node=False)
    group: int = flax.struct.field(pytree_node=False)
    axis: ClassVar[int]

    @property
    def num_tokens(self) -> int:
        return self.scale.shape[TOKENS] * (self.group if self.axis == TOKENS else 1)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The shape of the tensor it holds: [B, Hkv, S, hd]."""
        return (*self.scale.shape[:TOKENS], self.num_tokens, self.head_dim)

    @property
    def head_dim(self) -> int:
        return self.scale.shape[CHANNELS] * (self.group if self.axis == CHANNELS else 1)

    def unpacked_codes(self) -> jax.Array:
        """uint8 codes with ``axis`` split into [n // group, group]: keys [B, Hkv, S // group,
        group, hd], values [B, Hkv, S, hd // group, group]."""
        groups = self.scale.shape[self.axis]
        codes = unpack_bits(self.codes, self.bits, axis=self.axis, length=groups * self.group)
        return codes.reshape(*codes.shape[: self.axis], groups, self.group, *codes.shape[self.axis + 1 :])

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """[B, Hkv, S, hd] in ``dtype`` (computed in float32)."""
        codes = self.unpacked_codes().astype(jnp.float32)
        scale = jnp.expand_dims(self.scale.astype(jnp.float32), self.axis + 1)
        zero = jnp.expand_dims(self.zero.astype(jnp.float32), self.axis + 1)
        x = codes * scale + zero
        return x.reshape(*x.shape[: self.axis], -1, *x.shape[self.axis + 2 :]).astype(dtype)

    @classmethod
    def from_codes(cls, codes: jax.Array, scale: jax.Array, zero: jax.Array, bits: int, group: int):
        """Pack uint8 ``codes`` [B, Hkv, T, hd] (one per entry) with their ``scale`` and ``zero``
        (``axis`` reduced to T // group or hd // group groups)."""
        cls.check_grouping(bits, group, codes.shape[cls.axis])
        return cls(pack_bits(codes, bits, axis=cls.axis), scale, zero, bits=bits, group=group)

    @classmethod
    def zeros(cls, batch: int, heads: int, tokens: int, head_dim: int, bits: int, group: int, scale_dtype=jnp.float16):
        """An all-zero store of ``tokens`` slots, to preallocate a cache (keys: ``tokens`` a
        multiple of ``group``; values: ``head_dim`` a multiple of ``group``)."""
        shape = [batch, heads, tokens, head_dim]
        cls.check_grouping(bits, group, shape[cls.axis])
        scale_shape = list(shape)
        scale_shape[cls.axis] //= group
        shape[cls.axis] = -(-shape[cls.axis] // codes_per_word(bits))
        scales = jnp.zeros(scale_shape, scale_dtype)
        return cls(jnp.zeros(shape, jnp.uint32), scales, scales, bits=bits, group=group)

    def update(self, new: "QuantizedTensor", start: jax.Array | int) -> "QuantizedTensor":
        """Write ``new`` at token ``start``: one offset (may be traced), or int32 [B], one per
        row. Keys are written in whole groups: ``start`` a multiple of ``group``, and ``group`` a
        multiple of ``32 // bits`` so that groups start on word boundaries (true for group 64 and
        every bit width)."""
        word, grp = self._offsets(new, start)
        return self.replace(
            codes=_write_tokens(self.codes, new.codes, word),
            scale=_write_tokens(self.scale, new.scale, grp),
            zero=_write_tokens(self.zero, new.zero, grp),
        )

    def update_rows(self, new: "QuantizedTensor", rows: jax.Array, start: jax.Array | int) -> "QuantizedTensor":
        """Write ``new`` (n rows) into rows ``rows`` int32 [n] of this store, at token ``start``
        (one offset, as :meth:`update`'s); a row index past the last row is dropped."""
        word, grp = self._offsets(new, start)

        def put(x: jax.Array, y: jax.Array, at) -> jax.Array:
            slots = at + jnp.arange(y.shape[TOKENS])
            return x.at[rows[:, None], :, slots[None, :]].set(y.swapaxes(1, 2).astype(x.dtype), mode="drop")

        return self.replace(codes=put(self.codes, new.codes, word), scale=put(self.scale, new.scale, grp),
                            zero=put(self.zero, new.zero, grp))  # fmt: skip

    def _offsets(self, new: "QuantizedTensor", start):
        """(word, group) offsets along the tokens axis of token ``start``, after checking that
        ``new`` is a store of the same kind."""
        if (type(new), new.bits, new.group, new.head_dim) != (type(self), self.bits, self.group, self.head_dim):
            raise ValueError(
                f"new: {type(new).__name__} (bits, group, head_dim)={(new.bits, new.group, new.head_dim)} does not "
                f"match the store's {type(self).__name__} {(self.bits, self.group, self.head_dim)}"
            )
        if self.axis != TOKENS:
            return start, start
        per = codes_per_word(self.bits)
        if self.group % per:
            raise ValueError(f"group={self.group} must be a multiple of {per} to append {self.bits}-bit key groups")
        return start // per, start // self.group

    @classmethod
    def check_grouping(cls, bits: int, group: int, length: int) -> None:
        """ValueError (naming the argument) unless ``bits`` is a bit width and ``group`` divides
        ``length``, the size of this store's grouped axis."""
        check_bits_group(bits, group)
        if length % group:
            what = "the key length T" if cls.axis == TOKENS else "head_dim"
            raise ValueError(f"group={group} must divide {what}={length} (whole groups are quantized)")


@flax.struct.dataclass
class QuantizedKeys(QuantizedTensor):
    """Keys quantized per channel over groups of ``group`` tokens (outlier channels keep their
    own range): codes uint32 [B, Hkv, ceil(S / (32 // bits)), hd], packed along tokens;
    scale, zero [B, Hkv, S // group, hd]. Appended a whole group at a time."""

    axis: ClassVar[int] = TOKENS


@flax.struct.dataclass
class QuantizedValues(QuantizedTensor):
    """Values quantized per token over groups of ``group`` channels: codes uint32
    [B, Hkv, S, ceil(hd / (32 // bits))], packed along channels; scale, zero [B, Hkv, S, hd // group].
    Appended any number of tokens at a time."""

    axis: ClassVar[int] = CHANNELS


def check_quant_config(bits: int, group: int, head_dim: int) -> None:
    """Raise ValueError (naming the argument) unless ``bits``/``group`` suit ``head_dim`` (values
    are grouped along channels, so ``group`` must divide it)."""
    QuantizedValues.check_grouping(bits, group, head_dim)
