"""Quantized decode attention (Pallas): one query step against KIVI codes plus the
full-precision residual window, without materializing full-precision K/V.

Reference: :func:`dami_jax.tailorkv.quant_attention.quantized_attention` (same arguments, same
float32 [B, 1, Hq, hd] result). Layout (:mod:`dami_kernels.packing`): key codes uint32
[B, Hkv, S/per, hd] packed along tokens (per = 32 // bits codes a word; token t in word t // per
at bit bits * (t % per)), key scale/zero [B, Hkv, S/group, hd]; value codes uint32
[B, Hkv, S, hd/per] packed along channels, value scale/zero [B, Hkv, S, hd/group].

Program (b, h, j) over the store (split loop: :mod:`dami_kernels.blocks`) reads row b's length
(one int32) and the query rows of KV head h (float32 [rows, hd]); then, for each block of its
run, tokens [t, t + block) (``block`` a multiple of the key group):
- key words [block/per, hd] and key scale/zero [block/group, hd];
- value words [block, hd/per] and value scale/zero [block, hd/group];
- the visibility mask [block] (none without a mask);
and dequantizes the tile in registers: each word is repeated ``per`` times along its packed axis
and shifted by its code's bit offset, scales repeated ``group`` times; then K = codes * scale +
zero, V likewise, and the block softmax runs on them. The reference instead folds key scales into
one scaled query per token group; in a tile that would mean one dot per group, while the tile's
dequantization costs block * hd multiply-adds (as much as the score dot itself) and keeps one
dot per block. The residual window is a separate full-precision segment
(:func:`dami_kernels.decode_attention.dense_partials`).

Supported layouts (:func:`dami_kernels.blocks.unsupported`): head_dim a power of two >= 16
holding whole value words, power-of-two groups, key groups of whole words (group 64 suits every
bit width).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dami_kernels.blocks import F32, SPLITS, Partials, Segment, attend, quantized_block
from dami_kernels.decode_attention import dense_partials
from dami_kernels.packing import QuantizedKeys, QuantizedValues
from dami_kernels.pallas_blocks import rows_at, split_partials


def _repeat(x: jax.Array, n: int, axis: int) -> jax.Array:
    """Each entry of the 2-D block ``x`` ``n`` times along ``axis`` (0 or 1)."""
    a, b = x.shape
    if axis == 0:
        return jnp.broadcast_to(x[:, None, :], (a, n, b)).reshape(a * n, b)
    return jnp.broadcast_to(x[:, :, None], (a, b, n)).reshape(a, b * n)


def _dequantize(words: jax.Array, scale: jax.Array, zero: jax.Array, bits: int, group: int, axis: int) -> jax.Array:
    """uint32 words packed along ``axis`` + scale/zero per ``group`` entries of it -> float32."""
    per = 32 // bits
    codes = _repeat(words, per, axis)
    shape = [1, 1]
    shape[axis] = codes.shape[axis]
    shifts = (jax.lax.broadcasted_iota(jnp.int32, tuple(shape), axis) % per * bits).astype(jnp.uint32)
    codes = (codes >> shifts) & jnp.uint32(2**bits - 1)
    return codes.astype(F32) * _repeat(scale, group, axis).astype(F32) + _repeat(zero, group, axis).astype(F32)


def _read_quantized(refs, start: jax.Array, live, *, k_bits: int, k_group: int, v_bits: int, v_group: int
                    ) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    kw_ref, ks_ref, kz_ref, vw_ref, vs_ref, vz_ref = refs
    k_per = 32 // k_bits
    words = rows_at(kw_ref, start // k_per, live(k_per))
    scale, zero = (rows_at(ref, start // k_group, live(k_group)) for ref in (ks_ref, kz_ref))
    k = _dequantize(words, scale, zero, k_bits, k_group, axis=0)
    v = _dequantize(*(rows_at(ref, start, live()) for ref in (vw_ref, vs_ref, vz_ref)), v_bits, v_group, axis=1)
    return k, v


def quant_partials(rows: jax.Array, segment: Segment, *, block: int, splits: int, interpret: bool) -> Partials:
    """rows [B, Hkv, rows, hd] (:func:`query_rows`); a prepared segment (:func:`attend`) of the
    store's keys and values -> its partials."""
    keys, values = segment.k, segment.v
    bt = quantized_block(keys, values, block)
    read = functools.partial(
        _read_quantized, k_bits=keys.bits, k_group=keys.group, v_bits=values.bits, v_group=values.group
    )
    arrays = (keys.codes, keys.scale, keys.zero, values.codes, values.scale, values.zero)
    return split_partials(read, rows, segment, arrays, block=bt, splits=splits, interpret=interpret)


def quantized_attention(q: jax.Array, keys: QuantizedKeys, values: QuantizedValues, k_res: jax.Array, v_res: jax.Array,
                        mask_quant: jax.Array | None, mask_res: jax.Array | None, *,
                        lengths_quant: jax.Array | None = None, lengths_res: jax.Array | None = None, block: int = 64,
                        splits: int = SPLITS, interpret: bool = False) -> jax.Array:  # fmt: skip
    """q [B, 1, Hq, hd]; keys, values: quantized [B, Hkv, S_q, hd]; k_res, v_res [B, Hkv, S_r, hd];
    mask_quant bool [B, 1, S_q], mask_res bool [B, 1, S_r] (None: all visible) -> float32
    [B, 1, Hq, hd], as the reference. ``lengths_quant``, ``lengths_res``: int32 [B], live slots
    per row of each part (None: all; slots past them are neither read nor attended).
    ``block``: tokens per loop step (a power of two >= 16); ``splits``: programs per (row, KV head)."""
    dense, quantized = (functools.partial(f, block=block, splits=splits, interpret=interpret)
                        for f in (dense_partials, quant_partials))  # fmt: skip
    segments = [Segment(keys, values, mask_quant, lengths_quant), Segment(k_res, v_res, mask_res, lengths_res)]
    return attend(q, segments, dense, quantized)
