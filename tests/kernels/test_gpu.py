"""Compiled kernels on a GPU against the pure-jnp references (skipped without a GPU): the Pallas
kernels through Pallas' Triton lowering, the Triton kernel through jax-triton, the MoE MLP's
grouped matmul (``ragged_dot``) against every expert on every token. Sizes of a real
decode step: a 1024-token store, a ring of R + 1 = 129 tokens, SmolLM2's and Llama's GQA groups;
a per-slot dense cache of 8192 slots with rows of very different lengths (NaN past them)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from kernel_cases import (
    TOLERANCE,
    assert_matches_reference64,
    dense_case,
    dense_reference64,
    edge_lengths,
    gaussian,
    quantize_case,
    quantized_case,
    quantized_reference64,
    with_dead_slots,
)

import dami_jax as dj
from dami_jax.models.attention import attention
from dami_jax.models import moe
from dami_jax.models.config import ModelConfig
from dami_jax.tailorkv import cache, quant_attention
from dami_kernels import decode_attention as pallas_dense
from dami_kernels import quant_attention as pallas_quant
from dami_kernels.decode_attention import segment_attention
from dami_kernels.sparse_scores import MODES, token_scores

pytestmark = pytest.mark.gpu

LAYOUTS = pytest.mark.parametrize("head_dim, gqa, bits", [(64, 3, 1), (64, 3, 2), (128, 4, 4)])


def quantized(head_dim: int, gqa: int, bits: int):
    """The reference's arguments: batch 2 (rows of different lengths), 3 KV heads, group 64."""
    raw = quantized_case(0, 2, 3, gqa, head_dim, 1024, 129)
    return jax.jit(quantize_case, static_argnums=(1, 2, 3, 4, 5))(raw, bits, 64, bits, 64, jnp.float16)


def triton_module():
    """dami_kernels.triton_attention (it imports jax-triton on first launch)."""
    pytest.importorskip("jax_triton", reason="jax-triton is not installed (the gpu extra)")
    from dami_kernels import triton_attention

    return triton_attention


@LAYOUTS
def test_pallas_quantized_attention(highest_precision, head_dim, gqa, bits):
    case = quantized(head_dim, gqa, bits)
    out = jax.jit(pallas_quant.quantized_attention)(*case)
    assert rel_err(out, jax.jit(quant_attention.quantized_attention)(*case)) <= TOLERANCE


@LAYOUTS
def test_triton_quantized_attention(highest_precision, head_dim, gqa, bits):
    case = quantized(head_dim, gqa, bits)
    out = jax.jit(triton_module().quantized_attention)(*case)
    assert rel_err(out, jax.jit(quant_attention.quantized_attention)(*case)) <= TOLERANCE


@pytest.mark.parametrize("kernel", ["pallas", "triton"])
@pytest.mark.parametrize("head_dim, gqa", [(64, 3), (128, 4)])
def test_dense_decode_attention_with_lengths(highest_precision, kernel, head_dim, gqa):
    """bfloat16 K/V of 8192 slots; rows of lengths 0, 1, 63, 64, 65, 1000, 8191, 8192."""
    capacity = 8192
    lengths = np.asarray(edge_lengths(capacity)[:5] + [1000] + edge_lengths(capacity)[-2:], np.int32)
    q, k, v = dense_case(0, lengths, 2, gqa, capacity, head_dim, jnp.bfloat16)
    module = pallas_dense if kernel == "pallas" else triton_module()
    out = jax.jit(module.decode_attention)(q, k, v, jnp.asarray(lengths))
    assert_matches_reference64(out, dense_reference64(q, k, v, lengths))


@pytest.mark.parametrize("kernel", ["pallas", "triton"])
@LAYOUTS
def test_quantized_attention_with_lengths(highest_precision, kernel, head_dim, gqa, bits):
    """An idle row (no live slot), and a row of 700 store and 65 ring slots; NaN past them."""
    module = pallas_quant if kernel == "pallas" else triton_module()
    lengths = np.asarray([0, 700]), np.asarray([0, 65])
    case = with_dead_slots(quantized(head_dim, gqa, bits), *lengths)
    attend = functools.partial(module.quantized_attention, lengths_quant=jnp.asarray(lengths[0]),
                               lengths_res=jnp.asarray(lengths[1]))  # fmt: skip
    assert_matches_reference64(jax.jit(attend)(*case), quantized_reference64(case, *lengths))


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


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_grouped_experts_equal_every_expert_on_every_token(dtype, tolerance):
    """``ragged_dot``'s GPU lowering in the MoE MLP: Qwen3-30B-A3B's routing (128 experts, 8 per
    token, renormalized) at a reduced width, 2 x 48 tokens, against the dense reference."""
    cfg = ModelConfig(architecture="qwen3_moe", vocab_size=64, hidden_size=256, intermediate_size=512, num_layers=1,
                      num_heads=4, num_kv_heads=4, head_dim=64, num_experts=128, experts_per_token=8,
                      moe_intermediate_size=128, norm_topk_prob=True)  # fmt: skip
    keys = jax.random.split(jax.random.key(0), 5)
    e, d, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    weights = {name: (0.1 * jax.random.normal(k, shape)).astype(dtype)
               for k, (name, shape) in zip(keys, {"gate": (e, d, i), "up": (e, d, i), "down": (e, i, d)}.items())}  # fmt: skip
    x, logits = jax.random.normal(keys[3], (2, 48, d)), 2.0 * jax.random.normal(keys[4], (2, 48, e))
    with jax.default_matmul_precision("highest" if dtype == jnp.float32 else "default"):  # bf16 products as served
        grouped, dense = (jax.jit(fn, static_argnums=1)(weights, cfg, x, logits) for fn in (moe.experts_mlp, moe.dense_experts_mlp))
    assert rel_err(grouped, dense) < tolerance
