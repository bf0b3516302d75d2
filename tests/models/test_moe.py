"""The mixture-of-experts MLP (grouped by expert through ``ragged_dot``) against its dense
reference (every expert on every token), with and without renormalized routing, on plain weights
and on rows that each mix the two endpoints at their own lambda. Parity with transformers:
test_parity.py."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from dami_jax.models.config import ModelConfig
from dami_jax.models.moe import dense_experts_mlp, experts_mlp
from dami_jax.models.rowmix import mix_rows

pytestmark = pytest.mark.usefixtures("highest_precision")

CFG = ModelConfig(architecture="qwen3_moe", vocab_size=64, hidden_size=48, intermediate_size=96, num_layers=1, num_heads=4,
                  num_kv_heads=2, head_dim=16, num_experts=8, experts_per_token=3, moe_intermediate_size=40)  # fmt: skip


def experts(seed: int, dtype=jnp.float32) -> dict:
    keys = jax.random.split(jax.random.key(seed), 3)
    e, d, i = CFG.num_experts, CFG.hidden_size, CFG.moe_intermediate_size
    shapes = {"gate": (e, d, i), "up": (e, d, i), "down": (e, i, d)}
    return {name: (0.2 * jax.random.normal(k, shape)).astype(dtype) for k, (name, shape) in zip(keys, shapes.items())}


def inputs(seed: int, batch: int = 3, tokens: int = 5) -> tuple[jax.Array, jax.Array]:
    kx, kl = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (batch, tokens, CFG.hidden_size)), 2.0 * jax.random.normal(kl, (batch, tokens, CFG.num_experts))


@pytest.mark.parametrize("renormalize", [True, False])
def test_grouped_experts_equal_every_expert_on_every_token(renormalize):
    cfg = dataclasses.replace(CFG, norm_topk_prob=renormalize)
    x, logits = inputs(0)
    grouped, dense = (jax.jit(fn, static_argnums=1)(experts(1), cfg, x, logits) for fn in (experts_mlp, dense_experts_mlp))
    assert rel_err(grouped, dense) < 1e-5 and float(jnp.abs(dense).max()) > 0.1


def test_rows_at_their_own_lambda_equal_the_interpolated_experts():
    """Each row on (1 - lam) first + lam second, mixed per op, equals that row on the interpolated
    experts; lambda 0 and 1 are the endpoints exactly."""
    first, second = experts(2), experts(3)
    x, logits = inputs(4, batch=4)
    lam = jnp.asarray([0.0, 0.3, 0.7, 1.0])
    mixed = np.asarray(jax.jit(experts_mlp, static_argnums=1)(mix_rows(first, second, lam), CFG, x, logits))
    for row, value in enumerate(np.asarray(lam)):
        theta = jax.tree.map(lambda a, b: (1 - value) * a + value * b, first, second)
        alone = np.asarray(dense_experts_mlp(theta, CFG, x[row : row + 1], logits[row : row + 1]))[0]
        assert rel_err(mixed[row], alone) < 1e-5
    np.testing.assert_array_equal(mixed[0], np.asarray(experts_mlp(first, CFG, x, logits))[0])
    np.testing.assert_array_equal(mixed[3], np.asarray(experts_mlp(second, CFG, x, logits))[3])
