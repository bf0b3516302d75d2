"""Decode attention over a KIVI-style quantized KV store plus a full-precision residual.

Pure jnp. Scales and zero points are folded into the small operands instead of dequantizing
the large one:

    q . K_quant[s]  = sum_c (q_c * scale[g(s), c]) * code[s, c] + sum_c q_c * zero[g(s), c]
    P . V_quant[:, c] = sum_s (p_s * scale[s, g(c)]) * code[s, c] + sum_s p_s * zero[s, g(c)]

so the packed codes only ever meet matmuls as small integers. One softmax spans both parts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dami_jax.models.attention import MASKED_SCORE
from dami_kernels.packing import QuantizedKeys, QuantizedValues

F32 = jnp.float32


def quantized_attention(
    q: jax.Array,
    keys: QuantizedKeys,
    values: QuantizedValues,
    k_res: jax.Array,
    v_res: jax.Array,
    mask_quant: jax.Array,
    mask_res: jax.Array,
) -> jax.Array:
    """GQA softmax attention over [quantized store (S_q tokens) + residual (S_r tokens)].

    q: [B, T, Hq, hd]; keys, values: quantized [B, Hkv, S_q, hd]; k_res, v_res: [B, Hkv, S_r, hd];
    mask_quant: bool [B, T, S_q]; mask_res: bool [B, T, S_r] (True = visible).
    Returns float32 [B, T, Hq, hd], equal (up to float rounding) to ``attention`` over the
    dequantized store concatenated with the residual. Unused store slots must hold finite
    numbers (``QuantizedKeys.zeros`` does): masked probabilities are 0, and 0 * nan = nan.
    """
    b, t, hq, hd = q.shape
    hkv = k_res.shape[1]
    s_q = keys.num_tokens
    if values.num_tokens != s_q or hq % hkv:
        raise ValueError(f"values: {values.num_tokens} tokens vs keys' {s_q}; or Hq={hq} not a multiple of Hkv={hkv}")
    qg = q.reshape(b, t, hkv, hq // hkv, hd).astype(F32)

    # q . K_quant: per token group n, (q * scale_n) . codes + q . zero_n.
    k_codes = keys.unpacked_codes().astype(F32)  # [B, Hkv, N, group, hd]
    q_scaled = jnp.einsum("bthgd,bhnd->bhgtnd", qg, keys.scale.astype(F32))
    s_quant = jnp.einsum("bhgtnd,bhnjd->bhgtnj", q_scaled, k_codes)
    s_quant = s_quant + jnp.einsum("bthgd,bhnd->bhgtn", qg, keys.zero.astype(F32))[..., None]
    s_quant = s_quant.reshape(b, hkv, hq // hkv, t, s_q)
    s_res = jnp.einsum("bthgd,bhsd->bhgts", qg, k_res.astype(F32))

    scores = jnp.concatenate([s_quant, s_res], axis=-1) * hd**-0.5
    mask = jnp.concatenate([mask_quant, mask_res], axis=-1)
    scores = jnp.where(mask[:, None, None], scores, MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1)
    p_quant, p_res = probs[..., :s_q], probs[..., s_q:]

    # P . V_quant: per channel group n, (p * scale_n) . codes + p . zero_n.
    v_codes = values.unpacked_codes().astype(F32)  # [B, Hkv, S_q, N, group]
    p_scaled = p_quant[..., None] * values.scale.astype(F32)[:, :, None, None]  # [B, Hkv, G, T, S_q, N]
    out = jnp.einsum("bhgtsn,bhsnj->bhgtnj", p_scaled, v_codes)
    out = out + jnp.einsum("bhgts,bhsn->bhgtn", p_quant, values.zero.astype(F32))[..., None]
    out = out.reshape(b, hkv, hq // hkv, t, hd)
    out = out + jnp.einsum("bhgts,bhsd->bhgtd", p_res, v_res.astype(F32))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, hd)
