"""Compiled kernels on a GPU against the pure-jnp references (skipped without a GPU): the Pallas
kernels through Pallas' Triton lowering, the Triton kernel through jax-triton. Sizes of a real
decode step: a 1024-token store, a ring of R + 1 = 129 tokens, SmolLM2's and Llama's GQA groups."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from kernel_cases import TOLERANCE, gaussian, quantize_case, quantized_case

import dami_jax as dj
from dami_jax.models.attention import attention
from dami_jax.models.config import ModelConfig
from dami_jax.tailorkv import cache, quant_attention
from dami_kernels.decode_attention import segment_attention
from dami_kernels.quant_attention import quantized_attention
from dami_kernels.sparse_scores import MODES, token_scores

pytestmark = pytest.mark.gpu

LAYOUTS = pytest.mark.parametrize("head_dim, gqa, bits", [(64, 3, 1), (64, 3, 2), (128, 4, 4)])


def quantized(head_dim: int, gqa: int, bits: int):
    """The reference's arguments: batch 2 (rows of different lengths), 3 KV heads, group 64."""
    raw = quantized_case(0, 2, 3, gqa, head_dim, 1024, 129)
    return jax.jit(quantize_case, static_argnums=(1, 2, 3, 4, 5))(raw, bits, 64, bits, 64, jnp.float16)


@LAYOUTS
def test_pallas_quantized_attention(highest_precision, head_dim, gqa, bits):
    case = quantized(head_dim, gqa, bits)
    out = jax.jit(quantized_attention)(*case)
    assert rel_err(out, jax.jit(quant_attention.quantized_attention)(*case)) <= TOLERANCE


@LAYOUTS
def test_triton_quantized_attention(highest_precision, head_dim, gqa, bits):
    pytest.importorskip("jax_triton", reason="jax-triton is not installed (the gpu extra)")
    from dami_kernels import triton_attention

    case = quantized(head_dim, gqa, bits)
    out = jax.jit(triton_attention.quantized_attention)(*case)
    assert rel_err(out, jax.jit(quant_attention.quantized_attention)(*case)) <= TOLERANCE


def test_pallas_sparse_layer(highest_precision):
    """Scores over a 4000-token prompt at 12 channels read from the transposed keys; attention
    over window (64) + top-k (128) + generated (256) bfloat16 tokens with per-head masks."""
    rng = np.random.default_rng(0)
    b, hkv, gqa, hd, prompt, c = 2, 3, 3, 64, 4000, 12
    kt = gaussian(rng, (b, hkv, hd, prompt), jnp.bfloat16)
    channels = jnp.asarray(np.argsort(rng.random((b, hkv, hd)), axis=-1)[..., :c], jnp.int32)
    q_channels = gaussian(rng, (b, hkv, gqa, c))
    rows = jnp.take_along_axis(kt, channels[..., None], axis=2)
    for mode in MODES:
        out = jax.jit(functools.partial(token_scores, mode=mode))(q_channels, kt, channels=channels)
        assert rel_err(out, cache.token_scores(q_channels, rows, mode)) <= TOLERANCE
    q = gaussian(rng, (b, 1, hkv * gqa, hd))
    segments = [
        (gaussian(rng, (b, hkv, s, hd), jnp.bfloat16), gaussian(rng, (b, hkv, s, hd), jnp.bfloat16),
         jnp.asarray(rng.random((b, hkv, s)) < 0.7))
        for s in (64, 128, 256)
    ]  # fmt: skip
    out = jax.jit(segment_attention)(q, segments)
    k, v = (jnp.concatenate([s[i].astype(jnp.float32) for s in segments], axis=2) for i in (0, 1))
    mask = jnp.concatenate([s[2] for s in segments], axis=-1)[:, :, None]
    assert rel_err(out, attention(q, k, v, mask)) <= TOLERANCE


@pytest.mark.parametrize("kernel", ["pallas", "triton"])
def test_tailorkv_generation_gives_the_xla_tokens(kernel):
    """Greedy TailorKV-1 decoding on the GPU with each kernel choice, against the XLA path."""
    if kernel == "triton":
        pytest.importorskip("jax_triton", reason="jax-triton is not installed (the gpu extra)")
    cfg = ModelConfig(architecture="llama", vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=4,
                      num_heads=6, num_kv_heads=2, head_dim=64, max_position_embeddings=8192)  # fmt: skip
    params = dj.init_params(cfg, jax.random.key(0), scale=0.15)
    rows = [np.random.default_rng(i).integers(0, cfg.vocab_size, n).tolist() for i, n in enumerate((3000, 2100))]
    config = dataclasses.replace(cache.TAILORKV_1, quantized_layers=(0,), kernel="xla")
    xla = dj.generate(params, cfg, rows, max_new_tokens=140, stop_tokens=[], cache=config)
    out = dj.generate(params, cfg, rows, max_new_tokens=140, stop_tokens=[], cache=dataclasses.replace(config, kernel=kernel))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(xla.tokens))
