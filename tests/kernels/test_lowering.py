"""The Pallas kernels lower through Pallas' Triton backend for a CUDA GPU, checked here without
one: ``jax.export`` lowers for the ``cuda`` platform on any machine. Lowering is where Triton's
rules bite (power-of-two tensor sizes, 2-D dots, supported primitives); the gpu tests compile
and run them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import export

from dami_kernels.decode_attention import decode_attention, segment_attention
from dami_kernels.packing import QuantizedKeys, QuantizedValues
from dami_kernels.quant_attention import quantized_attention
from dami_kernels.sparse_scores import MODES, token_scores

TRITON_CALL = "__gpu$xla.gpu.triton"
B, HKV, GQA = 2, 3, 3


def triton_calls(fn, *args) -> int:
    """How many Triton kernels ``jit(fn)(*args)`` lowers to for CUDA."""
    exported = export.export(
        jax.jit(fn), platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    )
    return exported(*args).mlir_module().count(f"@{TRITON_CALL}(")


@pytest.mark.parametrize("head_dim, bits, group", [(64, 1, 64), (64, 2, 64), (128, 4, 32)])
def test_quantized_attention_lowers(head_dim, bits, group):
    """TailorKV's layouts: a store of whole R-blocks (R = 128) and a ring of R + 1 tokens."""
    s_q, s_r = 384, 129
    keys = QuantizedKeys.zeros(B, HKV, s_q, head_dim, bits, group)
    values = QuantizedValues.zeros(B, HKV, s_q, head_dim, bits, group)
    q, ring = jnp.zeros((B, 1, GQA * HKV, head_dim), jnp.bfloat16), jnp.zeros((B, HKV, s_r, head_dim), jnp.bfloat16)
    masks = jnp.ones((B, 1, s_q), bool), jnp.ones((B, 1, s_r), bool)
    assert triton_calls(quantized_attention, q, keys, values, ring, ring, *masks) == 2
    lengths = jnp.zeros((B,), jnp.int32)
    with_lengths = lambda *args: quantized_attention(*args, lengths_quant=lengths, lengths_res=lengths)  # noqa: E731
    assert triton_calls(with_lengths, q, keys, values, ring, ring, *masks) == 2


def test_dense_decode_attention_with_lengths_lowers():
    """A per-slot cache of 40960 slots (Qwen3's context; not a power of two), no mask."""
    hd, capacity = 128, 40960
    q, cache = jnp.zeros((B, 1, GQA * HKV, hd), jnp.bfloat16), jnp.zeros((B, HKV, capacity, hd), jnp.bfloat16)
    assert triton_calls(decode_attention, q, cache, cache, jnp.zeros((B,), jnp.int32)) == 1


def test_sparse_layer_kernels_lower():
    """Scoring from the transposed keys or gathered rows (12 channels: not a power of two) and
    attention over window + top-k + generated tokens with per-head masks."""
    hd, prompt, c = 64, 1000, 12
    q_channels = jnp.zeros((B, HKV, GQA, c), jnp.bfloat16)
    kt, channels = jnp.zeros((B, HKV, hd, prompt), jnp.bfloat16), jnp.zeros((B, HKV, c), jnp.int32)
    for mode in MODES:
        assert triton_calls(lambda q, kt, ch: token_scores(q, kt, mode, channels=ch), q_channels, kt, channels) == 1
        assert triton_calls(lambda q, rows: token_scores(q, rows, mode), q_channels, kt[:, :, :c]) == 1
    q = jnp.zeros((B, 1, GQA * HKV, hd), jnp.bfloat16)
    segments = [
        (jnp.zeros((B, HKV, s, hd), jnp.bfloat16),) * 2 + (jnp.ones((B, HKV, s), bool),) for s in (64, 128, 300)
    ]
    assert triton_calls(segment_attention, q, segments) == 3
    segments[2] += (jnp.zeros((B,), jnp.int32),)  # the generated tokens, up to each row's count
    assert triton_calls(segment_attention, q, segments) == 3
