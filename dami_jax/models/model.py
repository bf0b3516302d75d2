"""The decoder (Llama / Qwen2 / Qwen3 / Qwen3-MoE) as pure functions of ``(params, cfg, tokens, cache)``.

Numerics: the residual stream, norms, RoPE and softmax are float32; matmuls take their inputs
in the parameter dtype (bf16 stays bf16 on the MXU/tensor cores) and accumulate in float32.
Every parameter is consumed through :func:`dami_jax.models.rowmix.per_row`, so params whose
leaves are :class:`~dami_jax.models.rowmix.RowMix` (a lambda per batch row) run the same code.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from dami_jax.models.attention import attention, causal_mask
from dami_jax.models.config import ModelConfig
from dami_jax.models.low_rank import LowRankKernel
from dami_jax.models.moe import experts_mlp
from dami_jax.models.params import Params
from dami_jax.models.rowmix import per_row


class KVCache(Protocol):
    """What the decoder needs from a cache. Every method returns a new cache."""

    def positions(self, num_tokens: int) -> jax.Array:
        """RoPE positions int32 [B, num_tokens] of the next tokens to be appended."""

    def attend(
        self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array, next_query: jax.Array | None = None
    ) -> tuple[jax.Array, "KVCache"]:
        """Append this step's k, v [B, T, Hkv, hd] for ``layer`` and attend q [B, T, Hq, hd]
        over everything visible; returns (float32 [B, T, Hq, hd], updated cache).
        ``next_query``: layer+1's query predicted from this layer's input, when asked for."""

    def wants_next_query(self, layer: int) -> bool:
        """Whether ``layer`` needs a query predicted at ``layer - 1`` (static)."""

    def advance(self, num_tokens: int) -> "KVCache":
        """Mark ``num_tokens`` more slots as written (called once per step, after all layers)."""


def dense(x: jax.Array, kernel: jax.Array | LowRankKernel, bias: jax.Array | None = None) -> jax.Array:
    """x [B, ..., in] @ kernel [in, out] -> float32 [B, ..., out]; a :class:`LowRankKernel` as
    x @ W + (x @ A) @ B."""
    if isinstance(kernel, LowRankKernel):
        y = dense(x, kernel.kernel) + dense(dense(x, kernel.a), kernel.b)
        return y if bias is None else y + bias.astype(jnp.float32)
    y = per_row(kernel, lambda w: jnp.einsum("...i,io->...o", x.astype(w.dtype), w, preferred_element_type=jnp.float32))
    return y if bias is None else per_row(bias, lambda b: y + b.astype(jnp.float32))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x [B, ..., D] normalized over D, times weight [D]; float32."""
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return per_row(weight, lambda w: x * w.astype(jnp.float32))


def rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Rotary embedding, half-split layout (as transformers). x [B, T, H, hd], positions [B, T]."""
    inv_freq = jnp.asarray(cfg.rope.inverse_frequencies(cfg.head_dim))
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, hd/2]
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def project_q(p: Params, cfg: ModelConfig, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Normed input x [B, T, D] -> rotated queries [B, T, Hq, hd]."""
    b, t, _ = x.shape
    q = dense(x, p["q"], p.get("q_bias")).reshape(b, t, cfg.num_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
    return rope(q, positions, cfg)


def qkv(p: Params, cfg: ModelConfig, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Normed input x [B, T, D] -> q [B, T, Hq, hd], k, v [B, T, Hkv, hd]; q and k rotated."""
    b, t, _ = x.shape
    k = dense(x, p["k"], p.get("k_bias")).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = dense(x, p["v"], p.get("v_bias")).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    return project_q(p, cfg, x, positions), rope(k, positions, cfg), v


def mlp(p: Params, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """Normed x [B, T, D] -> float32 [B, T, D]: a SwiGLU MLP, or a mixture of them (a layer with a router)."""
    if "router" in p:
        return experts_mlp(p["experts"], cfg, x, dense(x, p["router"]))
    return dense(jax.nn.silu(dense(x, p["gate"])) * dense(x, p["up"]), p["down"])


class LayerView(NamedTuple):
    """What one decoder layer computed, handed to an observer (:func:`observe_layers`)."""

    index: int
    q: jax.Array  # rotated queries float32 [B, T, Hq, hd]
    k: jax.Array  # rotated keys float32 [B, T, Hkv, hd]
    v: jax.Array  # values float32 [B, T, Hkv, hd]
    output: jax.Array  # residual stream after the layer, float32 [B, T, D]


def block(
    p: Params,
    cfg: ModelConfig,
    h: jax.Array,
    positions: jax.Array,
    layer: int,
    cache: KVCache | None,
    next_attn: Params | None = None,
) -> tuple[jax.Array, KVCache | None, tuple[jax.Array, jax.Array, jax.Array]]:
    """One pre-norm transformer layer on the residual stream h float32 [B, T, D].

    Returns (new residual stream, cache, this layer's (q, k, v)). ``next_attn`` (the next layer's
    attention params) asks for a predicted next-layer query, computed from this layer's normed
    input and handed to the cache (TailorKV's lookahead).
    """
    b, t, _ = h.shape
    x = rms_norm(h, p["attn_norm"], cfg.rms_norm_eps)
    q, k, v = qkv(p["attn"], cfg, x, positions)
    if cache is None:
        out = attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), causal_mask(b, t))
    else:
        next_query = None if next_attn is None else project_q(next_attn, cfg, x, positions)
        out, cache = cache.attend(layer, q, k, v, next_query=next_query)
    h = h + dense(out.reshape(b, t, -1), p["attn"]["o"], p["attn"].get("o_bias"))
    return h + mlp(p["mlp"], cfg, rms_norm(h, p["mlp_norm"], cfg.rms_norm_eps)), cache, (q, k, v)


def _layers(
    params: Params, cfg: ModelConfig, tokens: jax.Array, cache: KVCache | None, observe: Callable[[LayerView], Any] | None
) -> tuple[jax.Array, KVCache | None, list[Any]]:
    """The decoder's one layer loop: (final-normed hidden, cache, what ``observe`` returned per layer)."""
    h = embed(params, tokens)
    positions = causal_positions(tokens) if cache is None else cache.positions(tokens.shape[1])
    layers, observed = params["layers"], []
    for i, layer in enumerate(layers):
        lookahead = cache is not None and i + 1 < len(layers) and cache.wants_next_query(i + 1)
        h, cache, (q, k, v) = block(layer, cfg, h, positions, i, cache, layers[i + 1]["attn"] if lookahead else None)
        if observe is not None:
            observed.append(observe(LayerView(i, q, k, v, h)))
    return rms_norm(h, params["final_norm"], cfg.rms_norm_eps), cache, observed


def decoder(
    params: Params, cfg: ModelConfig, tokens: jax.Array, cache: KVCache | None = None
) -> tuple[jax.Array, KVCache | None]:
    """tokens int32 [B, T] -> (final-normed hidden float32 [B, T, D], cache advanced by T).

    Without a cache this is the full causal pass over ``tokens`` at positions 0..T-1.
    """
    hidden, cache, _ = _layers(params, cfg, tokens, cache, None)
    return hidden, (None if cache is None else cache.advance(tokens.shape[1]))


def observe_layers(params: Params, cfg: ModelConfig, tokens: jax.Array, observe: Callable[[LayerView], Any]) -> list[Any]:
    """The full causal pass over ``tokens``, returning ``observe(view)`` for each layer in order.

    For analyses that need per-layer activations (representation continuity, layer profiling):
    they run the model's own loop rather than a copy of it. Traceable: call it under ``jax.jit``.
    """
    return _layers(params, cfg, tokens, None, observe)[2]


def embed(params: Params, tokens: jax.Array) -> jax.Array:
    """tokens int32 [B, T] -> float32 [B, T, D]."""
    return per_row(params["embed"], lambda table: table[tokens].astype(jnp.float32))


def causal_positions(tokens: jax.Array) -> jax.Array:
    b, t = tokens.shape
    return jnp.broadcast_to(jnp.arange(t), (b, t))


def lm_logits(params: Params, hidden: jax.Array) -> jax.Array:
    """Final-normed hidden [B, ..., D] -> float32 logits [B, ..., vocab] (tied or separate head)."""
    if "lm_head" in params:
        return dense(hidden, params["lm_head"])

    def tied_head(table: jax.Array) -> jax.Array:
        return jnp.einsum("...d,vd->...v", hidden.astype(table.dtype), table, preferred_element_type=jnp.float32)

    return per_row(params["embed"], tied_head)


@partial(jax.jit, static_argnums=1)
def forward(params: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Full causal pass: int32 [B, T] -> float32 logits [B, T, vocab]."""
    hidden, _ = decoder(params, cfg, tokens)
    return lm_logits(params, hidden)
