"""The mixture-of-experts MLP (Qwen3-MoE): each token runs on ``experts_per_token`` of the
layer's expert MLPs, chosen by the router's softmax, and their outputs are summed with the chosen
probabilities as weights (renormalized to 1 when ``norm_topk_prob``), as transformers does.

Token copies are sorted by expert and every expert's rows go through one grouped matmul
(``jax.lax.ragged_dot``), so the work follows the tokens routed, not E dense MLPs. The experts
are stacked leaves ([E, in, out]), consumed through :func:`~dami_jax.models.rowmix.per_row` like
every other weight: a batch whose rows each have their own lambda mixes the experts' outputs per
row, and the router's logits arrive mixed the same way, so routing happens on theta(lambda)
exactly as on an interpolated checkpoint.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dami_jax.models.config import ModelConfig
from dami_jax.models.params import Params
from dami_jax.models.rowmix import RowMix, per_row


def route(logits: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Router logits float32 [..., E] -> (weights float32 [..., k], chosen experts int32 [..., k])."""
    weights, chosen = jax.lax.top_k(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), cfg.experts_per_token)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights, chosen


def experts_mlp(experts: Params, cfg: ModelConfig, x: jax.Array, logits: jax.Array) -> jax.Array:
    """x float32 [B, T, D] through the experts ``experts`` (gate, up [E, D, I], down [E, I, D])
    that ``logits`` float32 [B, T, E] choose -> float32 [B, T, D]."""
    b, t, d = x.shape
    weights, chosen = route(logits, cfg)
    k = cfg.experts_per_token
    flat = chosen.reshape(-1)  # [B*T*k]: token copies in token order
    order = jnp.argsort(flat, stable=True)  # token copies sorted by expert
    restore = jnp.argsort(order)
    group_sizes = jnp.bincount(flat, length=cfg.num_experts).astype(jnp.int32)

    def grouped(rows: jax.Array, weight: jax.Array | RowMix) -> jax.Array:
        """Sorted rows [B*T*k, in] @ their experts' weight -> [B, T, k, out], in token order."""

        def product(w: jax.Array) -> jax.Array:
            out = jax.lax.ragged_dot(rows.astype(w.dtype), w, group_sizes, preferred_element_type=jnp.float32)
            return out[restore].reshape(b, t, k, -1)

        return per_row(weight, product)

    x_sorted = x.reshape(b * t, d)[order // k]
    hidden = jax.nn.silu(grouped(x_sorted, experts["gate"])) * grouped(x_sorted, experts["up"])  # [B, T, k, I]
    out = grouped(hidden.reshape(b * t * k, -1)[order], experts["down"])  # [B, T, k, D]
    return jnp.einsum("btk,btkd->btd", weights, out)


def dense_experts_mlp(experts: Params, cfg: ModelConfig, x: jax.Array, logits: jax.Array) -> jax.Array:
    """The reference :func:`experts_mlp` is checked against: every expert on every token
    ([B, T, E, D], E times the work), weighted by the same routing (zero for the experts not
    chosen). No sorting, no grouped matmul."""
    weights, chosen = route(logits, cfg)
    gates = jnp.sum(jax.nn.one_hot(chosen, cfg.num_experts, dtype=jnp.float32) * weights[..., None], axis=-2)  # [B, T, E]

    def every_expert(name: str, inputs: jax.Array, subscripts: str) -> jax.Array:
        def product(w: jax.Array) -> jax.Array:  # inputs rounded to the weights' dtype as the grouped path does; products exact in float32
            return jnp.einsum(subscripts, inputs.astype(w.dtype).astype(jnp.float32), w.astype(jnp.float32))

        return per_row(experts[name], product)

    hidden = jax.nn.silu(every_expert("gate", x, "btd,edi->btei")) * every_expert("up", x, "btd,edi->btei")
    return jnp.einsum("bte,bted->btd", gates, every_expert("down", hidden, "btei,eid->bted"))
