"""What computes TailorKV's decode attention, by the cache's resolved ``kernel`` ("xla", "pallas"
or "triton"; :meth:`~dami_jax.tailorkv.cache.TailorKVConfig.kernel_for`); Pallas on CPU runs in
its interpreter."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp

from dami_jax.models.attention import attention
from dami_jax.tailorkv.quant_attention import quantized_attention
from dami_kernels import decode_attention as pallas_attention
from dami_kernels import quant_attention as pallas_quant
from dami_kernels.blocks import Segment


def _interpret() -> bool:
    return jax.default_backend() == "cpu"


def quantized_attention_by(kernel: str, *args) -> jax.Array:
    """:func:`~dami_jax.tailorkv.quant_attention.quantized_attention` or its kernel."""
    if kernel == "xla":
        return quantized_attention(*args)
    if kernel == "triton":  # triton is an optional (GPU) dependency: imported when chosen
        return importlib.import_module("dami_kernels.triton_attention").quantized_attention(*args)
    return pallas_quant.quantized_attention(*args, interpret=_interpret())


def segment_attention_by(kernel: str, q: jax.Array, segments: list[tuple[jax.Array, jax.Array, jax.Array]],
                         generated: tuple[jax.Array, jax.Array, jax.Array], live: jax.Array) -> jax.Array:  # fmt: skip
    """Attention over a sparse layer's segments (k, v, mask: the window, the top-k rows) and its
    ``generated`` tokens (k, v, mask), the first ``live`` [B] of them visible. The kernels read
    only those (their blocks past a row's length are never loaded); XLA reads the store whole."""
    if kernel != "xla":
        k_gen, v_gen, _ = generated
        return pallas_attention.segment_attention(q, [*segments, Segment(k_gen, v_gen, None, live)], interpret=_interpret())
    segments = [*segments, generated]
    dtype = segments[-1][0].dtype
    keys = jnp.concatenate([k.astype(dtype) for k, _, _ in segments], axis=2)
    values = jnp.concatenate([v.astype(dtype) for _, v, _ in segments], axis=2)
    mask = jnp.concatenate([m for _, _, m in segments], axis=2)[:, :, None, :]  # [B, Hkv, T=1, S]
    return attention(q, keys, values, mask)
