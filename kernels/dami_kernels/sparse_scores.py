"""Sparse-layer token scoring (Pallas): partial dot products of every prompt token at a KV
group's critical channels, reading only those channels of the transposed keys.

Reference: :func:`dami_jax.tailorkv.cache.token_scores` (same ``mode`` values). The top-k
selection over the scores stays in XLA (``jax.lax.top_k``); attention over the selected rows,
sink + recent and generated tokens is :func:`dami_kernels.decode_attention.segment_attention`.

Program (b, h, i) scores prompt tokens [i * block, (i + 1) * block) for KV head h. It reads:
- the query values at the C chosen channels: float32 [C, rows], rows = the group's G heads
  (``"head_max"``, padded to a power of two by repeating the last head, which leaves the max
  unchanged) or their mean (``"group_mean"``, one row);
- the C channel indices: int32 [C];
- for each chosen channel c, one row of ``block`` keys: ``rows_ref[channel[c], block i]`` of the
  transposed keys [D, P] (D = hd with ``channels`` given: only C of the D rows are ever loaded;
  D = C for rows already gathered);
and accumulates score[r, p] = sum_c q[c, r] * key[channel[c], p], then writes max_r score[r, p]:
float32 [block], masked past the prompt's end.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dami_kernels.blocks import F32, next_power_of_2, token_block
from dami_kernels.pallas_blocks import COMPILER_PARAMS, load_rows, program_rows, store_rows

MODES = ("group_mean", "head_max")  # TailorKVConfig.token_score (dami_jax.tailorkv.cache.TOKEN_SCORES is this)


def _scores_kernel(q_ref, channels_ref, keys_ref, out_ref, *, length: int):
    block = out_ref.shape[0]
    exists = program_rows(length, block)

    def add_channel(c, acc):
        row = load_rows(keys_ref.at[channels_ref[c]], exists).astype(F32)
        return acc + q_ref[c][:, None] * row[None, :]

    acc = jax.lax.fori_loop(0, q_ref.shape[0], add_channel, jnp.zeros((q_ref.shape[1], block), F32))
    store_rows(out_ref, acc.max(axis=0), exists)


def token_scores(
    q_channels: jax.Array,
    channel_rows: jax.Array,
    mode: str,
    *,
    channels: jax.Array | None = None,
    block: int = 256,
    interpret: bool = False,
) -> jax.Array:
    """q_channels [B, Hkv, G, C]: each KV group's queries at its C chosen channels ->
    float32 [B, Hkv, P] partial scores, as the reference.

    channel_rows: [B, Hkv, C, P], the chosen channels of every prompt key (gathered already,
    e.g. on the host); or, with ``channels`` int32 [B, Hkv, C] given, the whole transposed keys
    [B, Hkv, hd, P], of which the kernel loads rows ``channels`` only.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got mode={mode!r}")
    b, hkv, g, c = q_channels.shape
    p = channel_rows.shape[3]
    q = q_channels.astype(F32)
    if mode == "group_mean":
        q = q.mean(axis=2, keepdims=True)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, next_power_of_2(q.shape[2]) - q.shape[2]), (0, 0)), mode="edge").swapaxes(2, 3)
    if channels is None:
        channels = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, hkv, c))
    bt = token_block(p, block)
    return pl.pallas_call(
        functools.partial(_scores_kernel, length=p),
        out_shape=jax.ShapeDtypeStruct((b, hkv, p), F32),
        grid=(b, hkv, pl.cdiv(p, bt)),
        in_specs=[
            pl.BlockSpec((None, None, *q.shape[2:]), lambda b, h, i: (b, h, 0, 0)),
            pl.BlockSpec((None, None, c), lambda b, h, i: (b, h, 0)),
            pl.BlockSpec((None, None, channel_rows.shape[2], bt), lambda b, h, i: (b, h, 0, i)),
        ],
        out_specs=pl.BlockSpec((None, None, bt), lambda b, h, i: (b, h, i)),
        interpret=interpret,
        compiler_params=COMPILER_PARAMS,
    )(q, channels.astype(jnp.int32), channel_rows)
