"""Inputs shared by the kernel tests: decode-attention cases in the caches' layouts, and a
launcher that runs a Triton :class:`Launch` on torch CPU tensors (Triton's interpreter)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import settings
from hypothesis import strategies as st

from dami_jax.tailorkv.quant import quantize_keys, quantize_values
from dami_kernels.packing import codes_per_word

# Interpret mode compiles every new shape (~2-4 s on 2 cores): few examples, no deadline.
FEW = settings(deadline=None, max_examples=8)
SEEDS = st.integers(0, 2**31 - 1)
BITS = st.sampled_from([1, 2, 4])
GQA = st.sampled_from([1, 2, 3, 4, 17])  # query heads per KV head: 17 needs 32 padded rows
BLOCKS = st.sampled_from([16, 32])
SCALE_DTYPES = st.sampled_from([jnp.float16, jnp.bfloat16, jnp.float32])

# Same float32 products as the references, summed in another order (blocks merged by their
# max): a few float32 ulps of the output's magnitude.
TOLERANCE = 1e-5


def gaussian(rng: np.random.Generator, shape, dtype=jnp.float32) -> jnp.ndarray:
    """Normal data with a random magnitude and offset, so scores span a wide range."""
    return jnp.asarray(rng.normal(size=shape) * 10.0 ** rng.uniform(-1, 0.5) + rng.uniform(-1, 1), dtype)


def prefix_mask(rng: np.random.Generator, batch: int, length: int) -> jnp.ndarray:
    """bool [B, 1, length]: row b sees its first n_b slots, n_b drawn in [0, length] (rows of
    different lengths; an empty row too)."""
    n = rng.integers(0, length + 1, size=batch)
    return jnp.asarray(np.arange(length)[None, None, :] < n[:, None, None])


def quantized_strategies(scale_dtypes=SCALE_DTYPES) -> dict:
    """``@given`` keywords for a quantized store + residual case (the Pallas and Triton tests
    draw the same space; draw the groups with :func:`draw_groups`)."""
    return dict(seed=SEEDS, batch=st.integers(1, 2), kv_heads=st.integers(1, 2), gqa=GQA, k_bits=BITS, v_bits=BITS,
                key_groups=st.integers(1, 3), residual=st.integers(1, 20), scale_dtype=scale_dtypes, block=BLOCKS,
                data=st.data())  # fmt: skip


def draw_groups(data, k_bits: int) -> tuple[int, int]:
    """(key group, value group): key groups of whole words up to 64 tokens, value groups 8-32."""
    k_group = data.draw(st.sampled_from(group_choices(k_bits, 64)), label="k_group")
    return k_group, data.draw(st.sampled_from([8, 16, 32]), label="v_group")


def group_choices(bits: int, limit: int) -> list[int]:
    """Power-of-two key groups of whole ``bits``-bit words, up to ``limit``."""
    return [g for g in (8, 16, 32, 64) if g % codes_per_word(bits) == 0 and g <= limit]


def quantized_case(seed: int, batch: int, kv_heads: int, gqa: int, head_dim: int, store: int, residual: int):
    """Float inputs for the reference: q, k, v (the store: ``store`` tokens), k_res, v_res
    (``residual`` tokens), mask_quant, mask_res (rows of different lengths). Quantize them with
    :func:`quantize_case` inside the test's jit (eager quantization compiles op by op)."""
    rng = np.random.default_rng(seed)
    q = gaussian(rng, (batch, 1, kv_heads * gqa, head_dim))
    k, v = (gaussian(rng, (batch, kv_heads, store, head_dim)) for _ in range(2))
    k_res, v_res = (gaussian(rng, (batch, kv_heads, residual, head_dim)) for _ in range(2))
    return q, k, v, k_res, v_res, prefix_mask(rng, batch, store), prefix_mask(rng, batch, residual)


def quantize_case(case, k_bits: int, k_group: int, v_bits: int, v_group: int, scale_dtype):
    """:func:`quantized_case`'s inputs with the store quantized: the reference's arguments."""
    q, k, v, *rest = case
    return q, quantize_keys(k, k_bits, k_group, scale_dtype), quantize_values(v, v_bits, v_group, scale_dtype), *rest


def torch_launch(launch):
    """Run a :class:`dami_kernels.triton_attention.Launch` on torch CPU tensors (Triton's
    interpreter under TRITON_INTERPRET=1) -> its outputs as jax arrays."""
    import torch

    def tensor(a):
        a = np.array(a)  # a writable copy
        # uint32 words as int32: the same bits, and the kernel masks every shifted code, so the sign never shows.
        return torch.from_numpy(a.view(np.int32) if a.dtype == np.uint32 else a)

    outputs = [torch.empty(o.shape, dtype=torch.float32) for o in launch.outputs]
    launch.kernel[launch.grid](*map(tensor, launch.args), *outputs, **launch.constants)
    return tuple(jnp.asarray(o.numpy()) for o in outputs)
