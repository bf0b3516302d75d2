"""The Triton quantized attention: its bodies through Triton's CPU interpreter against the same
reference as the Pallas kernels, and its compilation for a Hopper GPU (no GPU needed)."""

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
    draw_groups,
    quantize_case,
    quantized_case,
    quantized_strategies,
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


# Built in a fresh interpreter without TRITON_INTERPRET, so the kernels are compiled, not interpreted.
COMPILE = textwrap.dedent(
    """
    import inspect
    import jax.numpy as jnp
    import triton
    from triton.backends.compiler import GPUTarget
    from dami_kernels import triton_attention as ta
    from dami_kernels.blocks import query_rows
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
    for head_dim, bits in [(64, 1), (64, 2), (128, 4)]:
        rows = query_rows(jnp.zeros((b, 1, 3 * hkv, head_dim), jnp.bfloat16), hkv)
        keys = QuantizedKeys.zeros(b, hkv, s_q, head_dim, bits, 64)
        values = QuantizedValues.zeros(b, hkv, s_q, head_dim, bits, 64)
        window = jnp.zeros((b, hkv, s_r, head_dim), jnp.bfloat16)
        assert compile(ta.quant_launch(rows, keys, values, jnp.zeros((b, 1, s_q), jnp.int32), block=64))
        assert compile(ta.dense_launch(rows, window, window, jnp.zeros((b, hkv, s_r), jnp.int32), block=64))
    print("compiled")
    """
)


def test_kernels_compile_for_hopper():
    """Triton compiles both kernels to sm_90 machine code on this machine (type and shape rules
    that its interpreter does not check), for the layouts of TailorKV's presets."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("compiled")
