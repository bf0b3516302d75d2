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


NO_TOP_K = 0  # sample_rows' top_k for a row that keeps every token


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """:func:`sample_tokens` with each row's own setting as data rather than a static
    :class:`Sampling`, so that one compiled step serves any mix (the engine's slots).

    logits float32 [B, V]; keys [B]; temperature float32 [B] (0: greedy); top_k int32 [B]
    (``NO_TOP_K``: off); top_p float32 [B] (1: off). Row b gets exactly the token that
    ``sample_tokens(logits[b:b+1], keys[b:b+1], Sampling(temperature[b], top_k[b], top_p[b]))``
    picks: the same truncation (top-k, then nucleus, on the tempered logits) and the same draw.
    The sort behind truncation runs only when some row asks for it.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled = temperature > 0

    def draw(logits: jax.Array) -> jax.Array:
        tempered = logits / jnp.where(sampled, temperature, 1.0)[:, None]
        truncates = sampled & ((top_k != NO_TOP_K) | (top_p < 1))
        tempered = jax.lax.cond(jnp.any(truncates), lambda x: _truncate_rows(x, top_k, top_p), lambda x: x, tempered)
        return jax.vmap(jax.random.categorical)(keys, tempered).astype(jnp.int32)

    token = jax.lax.cond(jnp.any(sampled), draw, lambda logits: greedy, logits)
    return jnp.where(sampled, token, greedy)


def _truncate_rows(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """:func:`truncate_logits` with a top_k and a top_p per row (``NO_TOP_K`` / 1: that cut is off)."""
    descending = jnp.sort(logits, axis=-1)[:, ::-1]
    vocab = logits.shape[-1]
    k = jnp.where((top_k == NO_TOP_K) | (top_k >= vocab), vocab, top_k)
    kth = jnp.take_along_axis(descending, (k - 1)[:, None], axis=-1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    descending = jnp.where(descending < kth, -jnp.inf, descending)  # the sorted survivors of the top-k cut
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    threshold = jnp.min(jnp.where(mass_before < top_p[:, None], descending, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((top_p[:, None] < 1) & (logits < threshold), -jnp.inf, logits)
