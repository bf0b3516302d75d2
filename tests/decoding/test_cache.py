"""The dense cache: a decode step updates the donated cache in place (no copies of it)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

import dami_jax as dj
from dami_jax.decoding.cache import DenseKVCache
from dami_jax.decoding.generation import decode_step
from dami_jax.models.config import ModelConfig

SIZE = 777  # a cache length no other array in the step has


@pytest.mark.parametrize("batch, num_kv_heads", [(1, 1), (1, 2), (2, 2)])
def test_decode_step_does_not_copy_the_cache(batch, num_kv_heads):
    """XLA:CPU used to copy every layer's K and V four times per step (batch 1): 8k-context
    decode then moved ~4 GB/s instead of streaming the cache once."""
    cfg = ModelConfig(architecture="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=num_kv_heads, head_dim=16, max_position_embeddings=1024)  # fmt: skip
    with jax.default_device(jax.devices("cpu")[0]):
        params = dj.init_params(cfg, jax.random.key(0))
        cache = DenseKVCache.create(cfg, jnp.zeros((batch,), jnp.int32), SIZE).advance(SIZE - 5)
        step = jax.jit(decode_step, static_argnums=1, donate_argnums=3)
        hlo = step.lower(params, cfg, jnp.zeros((batch,), jnp.int32), cache).compile().as_text()
    cache_shape = rf"f32\[{batch},{num_kv_heads},{SIZE},{cfg.head_dim}\]"
    assert re.search(cache_shape, hlo), "the pattern must match the cache's shape as the HLO prints it"
    copies = [line.strip()[:120] for line in hlo.splitlines() if re.search(cache_shape + r"\S* copy\(", line)]
    assert not copies, copies
