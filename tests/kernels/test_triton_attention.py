"""The Triton kernels: their bodies through Triton's CPU interpreter against the same references
as the Pallas kernels (quantized attention; dense decode attention and both parts of the
quantized one with per-row lengths, NaN past them), and their compilation for a Hopper GPU (no
GPU needed)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from conftest import rel_err
from hypothesis import given
from hypothesis import strategies as st
from kernel_cases import (
    FEW,
    TOLERANCE,
    assert_matches_reference64,
    dense_reference64,
    dense_strategies,
    draw_dense_case,
    draw_groups,
    draw_quantized_lengths_case,
    edge_case,
    quantize_case,
    quantized_case,
    quantized_reference64,
    quantized_strategies,
    spare,
    torch_launch,
)

from dami_jax.tailorkv import quant_attention as reference

interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton's interpreter is off (tests/conftest.py turns it on without a GPU); the gpu tests run the kernels",
)


@interpreted
@FEW
@given(**quantized_strategies(st.sampled_from([jnp.float16, jnp.float32])))  # torch takes no numpy bfloat16
def test_interpreted_matches_reference(
    seed, batch, kv_heads, gqa, k_bits, v_bits, key_groups, residual, scale_dtype, block, data
):
    from dami_kernels.triton_attention import quantized_attention

    k_group, v_group = draw_groups(data, k_bits)
    raw = quantized_case(seed, batch, kv_heads, gqa, 32, k_group * key_groups, residual)
    case = jax.jit(quantize_case, static_argnums=(1, 2, 3, 4, 5))(raw, k_bits, k_group, v_bits, v_group, scale_dtype)
    out = quantized_attention(*case, block=block, launch=torch_launch)
    assert out.shape == case[0].shape and out.dtype == jnp.float32
    assert rel_err(out, jax.jit(reference.quantized_attention)(*case)) <= TOLERANCE


@interpreted
@FEW
@given(**quantized_strategies(st.sampled_from([jnp.float16, jnp.float32])))
def test_interpreted_lengths_read_only_live_slots(
    seed, batch, kv_heads, gqa, k_bits, v_bits, key_groups, residual, scale_dtype, block, data
):
    """Store and residual lengths per row, NaN past them (as the Pallas kernel's test)."""
    from dami_kernels.triton_attention import quantized_attention

    case, lengths = draw_quantized_lengths_case(
        data, seed, batch, kv_heads, gqa, k_bits, v_bits, key_groups, residual, scale_dtype
    )
    out = quantized_attention(*case, lengths_quant=jnp.asarray(lengths[0]), lengths_res=jnp.asarray(lengths[1]),
                              block=block, launch=torch_launch)  # fmt: skip
    assert_matches_reference64(out, quantized_reference64(case, *lengths))


@interpreted
@FEW
@given(**dense_strategies(st.just(jnp.float32)))
def test_interpreted_decode_attention_matches_float64_over_live_slots(
    seed, capacity, batch, kv_heads, gqa, head_dim, dtype, block, splits, data
):
    from dami_kernels.triton_attention import decode_attention

    q, k, v, lengths = draw_dense_case(data, seed, capacity, batch, kv_heads, gqa, head_dim, dtype)
    out = decode_attention(q, k, v, jnp.asarray(lengths), block=block, splits=splits, launch=torch_launch)
    assert_matches_reference64(out, dense_reference64(q, k, v, lengths))


@interpreted
@pytest.mark.parametrize("block, splits, spare_rows", [(32, 3, 0), (16, 16, 0), (32, 3, 3)])
def test_interpreted_decode_attention_reads_each_row_up_to_its_length(block, splits, spare_rows):
    """Rows of lengths 0 (an idle slot: zeros), 1, 63, 64, 65, S - 1 and S in one batch; the
    cache's rows past the batch (NaN) never read, as the engine decodes slots 0..B-1 of more."""
    from dami_kernels.triton_attention import decode_attention

    q, k, v, lengths = edge_case(4)
    out = decode_attention(q, spare(k, spare_rows), spare(v, spare_rows), jnp.asarray(lengths), block=block, splits=splits,
                           launch=torch_launch)  # fmt: skip
    assert_matches_reference64(out, dense_reference64(q, k, v, lengths))


# Built in a fresh interpreter without TRITON_INTERPRET, so the kernels are compiled, not interpreted.
COMPILE = textwrap.dedent(
    """
    import inspect
    import jax.numpy as jnp
    import triton
    from triton.backends.compiler import GPUTarget
    from dami_kernels import triton_attention as ta
    from dami_kernels.blocks import Segment, query_rows
    from dami_kernels.packing import QuantizedKeys, QuantizedValues

    TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "uint32": "u32", "int32": "i32"}

    def compile(launch):
        arrays = [*launch.args, *launch.outputs]
        names = list(inspect.signature(launch.kernel.fn).parameters)
        signature = {n: "*" + TYPES[a.dtype.name] for n, a in zip(names, arrays)}
        signature.update(dict.fromkeys(launch.constants, "constexpr"))
        source = triton.compiler.ASTSource(launch.kernel, signature, launch.constants)
        options = dict(num_warps=ta.NUM_WARPS, num_stages=ta.NUM_STAGES)
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"]

    b, hkv, s_q, s_r = 2, 3, 384, 129
    lengths = jnp.zeros((b,), jnp.int32)
    for head_dim, bits in [(64, 1), (64, 2), (128, 4)]:
        rows = query_rows(jnp.zeros((b, 1, 3 * hkv, head_dim), jnp.bfloat16), hkv)
        keys = QuantizedKeys.zeros(b, hkv, s_q, head_dim, bits, 64)
        values = QuantizedValues.zeros(b, hkv, s_q, head_dim, bits, 64)
        window = jnp.zeros((b, hkv, s_r, head_dim), jnp.bfloat16)
        store = Segment(keys, values, jnp.zeros((b, 1, s_q), jnp.int32), lengths)
        assert compile(ta.quant_launch(rows, store, block=64, splits=16))
        assert compile(ta.dense_launch(rows, Segment(window, window, jnp.zeros((b, hkv, s_r), jnp.int32), lengths),
                                       block=64, splits=16))
        cache = jnp.zeros((b, hkv, 32768, head_dim), jnp.bfloat16)  # a dense per-slot cache, no mask
        assert compile(ta.dense_launch(rows, Segment(cache, cache, None, lengths), block=64, splits=16))
    print("compiled")
    """
)


def test_kernels_compile_for_hopper():
    """Triton compiles both kernels to sm_90 machine code on this machine (type and shape rules
    that its interpreter does not check), for the layouts of TailorKV's presets and a dense cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("compiled")
