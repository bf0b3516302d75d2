"""Quantized decode attention (Pallas): one query step against KIVI codes plus the
full-precision residual window, without materializing full-precision K/V.

Reference: :func:`dami_jax.tailorkv.quant_attention.quantized_attention` (same arguments, same
float32 [B, 1, Hq, hd] result). Layout (:mod:`dami_kernels.packing`): key codes uint32
[B, Hkv, S/per, hd] packed along tokens (per = 32 // bits codes a word; token t in word t // per
at bit bits * (t % per)), key scale/zero [B, Hkv, S/group, hd]; value codes uint32
[B, Hkv, S, hd/per] packed along channels, value scale/zero [B, Hkv, S, hd/group].

Program (b, h, i) over the store (block algorithm: :mod:`dami_kernels.blocks`) reads, for
block i of ``block`` tokens (a multiple of the key group):
- the query rows of KV head h: float32 [rows, hd];
- key words [block/per, hd] and key scale/zero [block/group, hd];
- value words [block, hd/per] and value scale/zero [block, hd/group];
- the visibility mask [block];
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
from jax.experimental import pallas as pl

from dami_kernels.blocks import F32, Partials, attend_quantized, block_softmax, quantized_block
from dami_kernels.decode_attention import dense_partials
from dami_kernels.packing import QuantizedKeys, QuantizedValues, codes_per_word
from dami_kernels.pallas_blocks import (
    load_rows,
    mask_spec,
    partials_call,
    program_rows,
    query_spec,
    store_partials,
    token_spec,
)


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


def _quant_kernel(q_ref, kw_ref, ks_ref, kz_ref, vw_ref, vs_ref, vz_ref, mask_ref, m_ref, l_ref, o_ref, *, length: int,
                  k_bits: int, k_group: int, v_bits: int, v_group: int):  # fmt: skip
    block = vw_ref.shape[0]
    exists = program_rows(length, block)
    k_per = 32 // k_bits
    words = load_rows(kw_ref, program_rows(length // k_per, block // k_per))
    key_groups = program_rows(length // k_group, block // k_group)
    k = _dequantize(words, load_rows(ks_ref, key_groups), load_rows(kz_ref, key_groups), k_bits, k_group, axis=0)
    v = _dequantize(
        load_rows(vw_ref, exists), load_rows(vs_ref, exists), load_rows(vz_ref, exists), v_bits, v_group, axis=1
    )
    store_partials(m_ref, l_ref, o_ref, block_softmax(q_ref[...], k, v, exists, load_rows(mask_ref, exists) != 0))


def quant_partials(rows: jax.Array, keys: QuantizedKeys, values: QuantizedValues, mask: jax.Array, *, block: int,
                   interpret: bool) -> Partials:  # fmt: skip
    """rows [B, Hkv, rows, hd] (:func:`query_rows`); the store; mask int32 [B, 1 or Hkv, S]
    (:func:`visibility`) -> the store's partials."""
    bt = quantized_block(keys, values, block)
    b, hkv, s, hd = *keys.scale.shape[:2], keys.num_tokens, keys.head_dim
    k_per, v_per = codes_per_word(keys.bits), codes_per_word(values.bits)
    specs = [
        query_spec(rows),
        token_spec(bt // k_per, hd), token_spec(bt // keys.group, hd), token_spec(bt // keys.group, hd),
        token_spec(bt, hd // v_per), token_spec(bt, hd // values.group), token_spec(bt, hd // values.group),
        mask_spec(mask, bt),
    ]  # fmt: skip
    kernel = functools.partial(
        _quant_kernel, length=s, k_bits=keys.bits, k_group=keys.group, v_bits=values.bits, v_group=values.group
    )
    args = (rows, keys.codes, keys.scale, keys.zero, values.codes, values.scale, values.zero, mask)
    return partials_call(kernel, (b, hkv, pl.cdiv(s, bt)), specs, args, rows.shape[2], hd, interpret)


def quantized_attention(
    q: jax.Array,
    keys: QuantizedKeys,
    values: QuantizedValues,
    k_res: jax.Array,
    v_res: jax.Array,
    mask_quant: jax.Array,
    mask_res: jax.Array,
    *,
    block: int = 64,
    interpret: bool = False,
) -> jax.Array:
    """q [B, 1, Hq, hd]; keys, values: quantized [B, Hkv, S_q, hd]; k_res, v_res [B, Hkv, S_r, hd];
    mask_quant bool [B, 1, S_q], mask_res bool [B, 1, S_r] -> float32 [B, 1, Hq, hd], as the
    reference. ``block``: tokens per program (a power of two >= 16)."""
    options = dict(block=block, interpret=interpret)
    quant, dense = functools.partial(quant_partials, **options), functools.partial(dense_partials, **options)
    return attend_quantized(q, keys, values, k_res, v_res, mask_quant, mask_res, quant, dense)
