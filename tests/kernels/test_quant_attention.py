"""Quantized decode attention (Pallas, interpret mode) against the pure-jnp reference
:func:`dami_jax.tailorkv.quant_attention.quantized_attention`, and, with per-row lengths for the
store and the residual, against a float64 reference over the live slots (NaN past them)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import pytest
from conftest import rel_err
from hypothesis import given
from kernel_cases import (
    FEW,
    TOLERANCE,
    assert_matches_reference64,
    draw_groups,
    draw_quantized_lengths_case,
    quantize_case,
    quantized_case,
    quantized_reference64,
    quantized_strategies,
)

from dami_jax.tailorkv import quant_attention as reference
from dami_kernels.blocks import unsupported
from dami_kernels.packing import QuantizedKeys, QuantizedValues
from dami_kernels.quant_attention import quantized_attention


@functools.partial(jax.jit, static_argnames=("quant", "block"))
def kernel_and_reference(case, quant, block):
    """quant: (k_bits, k_group, v_bits, v_group, scale_dtype) for :func:`quantize_case`."""
    case = quantize_case(case, *quant)
    return quantized_attention(*case, block=block, interpret=True), reference.quantized_attention(*case)


@FEW
@given(**quantized_strategies())
def test_matches_reference(seed, batch, kv_heads, gqa, k_bits, v_bits, key_groups, residual, scale_dtype, block, data):
    """bits x groups x store lengths off the block grid (odd numbers of key groups) x residual
    lengths x GQA ratios x batch rows of different lengths (empty rows included)."""
    k_group, v_group = draw_groups(data, k_bits)
    case = quantized_case(seed, batch, kv_heads, gqa, 32, k_group * key_groups, residual)
    out, ref = kernel_and_reference(case, (k_bits, k_group, v_bits, v_group, scale_dtype), block=block)
    assert out.shape == case[0].shape and out.dtype == jnp.float32
    assert rel_err(out, ref) <= TOLERANCE


@FEW
@given(**quantized_strategies())
def test_lengths_read_only_live_slots(seed, batch, kv_heads, gqa, k_bits, v_bits, key_groups, residual, scale_dtype,
                                      block, data):  # fmt: skip
    """Store and residual lengths per row (0, block and group edges, full), NaN past them."""
    case, lengths = draw_quantized_lengths_case(
        data, seed, batch, kv_heads, gqa, k_bits, v_bits, key_groups, residual, scale_dtype
    )
    kernel = jax.jit(functools.partial(quantized_attention, block=block, interpret=True))
    out = kernel(*case, lengths_quant=jnp.asarray(lengths[0]), lengths_res=jnp.asarray(lengths[1]))
    assert_matches_reference64(out, quantized_reference64(case, *lengths))


@pytest.mark.parametrize(
    "head_dim, bits, group, why",
    [
        (48, 4, 16, "head_dim=48 must be a power of two"),
        (16, 1, 16, "multiple of 32 (1-bit value words)"),
        (32, 1, 16, "key groups of whole 32-code words"),
        (32, 4, 24, "must be powers of two"),
    ],
)
def test_unsupported_layouts_are_named(head_dim, bits, group, why):
    keys = QuantizedKeys.zeros(1, 1, 2 * group, head_dim, bits, group)
    values = QuantizedValues.zeros(1, 1, 2 * group, head_dim, bits, 8 if group == 24 else group)
    assert why in unsupported(keys, values)
    q, window, mask = jnp.zeros((1, 1, 2, head_dim)), jnp.zeros((1, 1, 3, head_dim)), jnp.ones((1, 1, 2 * group), bool)
    with pytest.raises(ValueError, match=re.escape(why)):
        quantized_attention(q, keys, values, window, window, mask, mask[..., :3], interpret=True)
