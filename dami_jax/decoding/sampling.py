"""Token choice: greedy, or temperature / top-k / top-p sampling with an explicit PRNG key."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick the next token. ``temperature == 0`` is greedy (argmax).

    Static under jit: each distinct setting compiles once.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"Sampling.temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"Sampling.top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling.top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


def truncate_logits(logits: jax.Array, top_k: int | None, top_p: float | None) -> jax.Array:
    """Set logits outside the top-k / nucleus (top-p) set to -inf. logits float32 [B, V]."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # the top token always survives
        kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def split_key(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(carried key, key for this step) from one key, or row by row from per-row keys [B]."""
    pair = jax.random.split(key) if key.ndim == 0 else jax.vmap(jax.random.split)(key).swapaxes(0, 1)
    return pair[0], pair[1]


def sample_tokens(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """float32 [B, V] -> int32 [B]. ``key``: one key for the batch, or one per row [B] (then each
    row's draw depends only on its own key, whatever else is in the batch)."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = truncate_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    if key.ndim == 0:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    return jax.vmap(jax.random.categorical)(key, logits).astype(jnp.int32)
