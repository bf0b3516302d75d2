"""Pilot-study diagnostics of the interpolation path (ours; the DAMI paper only names them):

- representation continuity: linear CKA of per-layer hidden states between theta(lam) and
  theta(lam + delta), and against both endpoints;
- structural connectivity: held-out loss along the path against the straight line between the
  endpoint losses; the largest excess is the loss barrier (about 0 for linearly connected models).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dami_jax.dami.interpolation import interpolate
from dami_jax.dami.pair import ModelPair
from dami_jax.decoding.scoring import next_token_loss
from dami_jax.models.config import ModelConfig
from dami_jax.models.model import embed, observe_layers
from dami_jax.models.params import Params


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (int32 [B, T], bool [B, T] real-token mask), T the longest rounded up to
    ``multiple``. Right padding is exact for a causal pass without cache: pads come after every
    real token."""
    width = -(-max(map(len, sequences)) // multiple) * multiple
    tokens = np.full((len(sequences), width), pad_id, np.int32)
    mask = np.zeros((len(sequences), width), bool)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)], mask[i, : len(s)] = s, True
    return tokens, mask


@partial(jax.jit, static_argnums=1)
def hidden_states(params: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """float32 [L + 1, B, T, D]: the embedding output, then each layer's residual stream."""
    outputs = observe_layers(params, cfg, tokens, lambda view: view.output)
    return jnp.stack([embed(params, tokens), *outputs])


def linear_cka(x: jax.Array, y: jax.Array) -> jax.Array:
    """Linear CKA (Kornblith et al. 2019) of two representations x [n, d1], y [n, d2] of the same n items."""
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    cross = jnp.sum((y.T @ x) ** 2)
    return cross / (jnp.linalg.norm(x.T @ x) * jnp.linalg.norm(y.T @ y))


_cka_per_layer = jax.jit(jax.vmap(linear_cka))  # [L + 1, n, D] x2 -> [L + 1]


@dataclasses.dataclass(frozen=True)
class Continuity:
    lambdas: tuple[float, ...]
    delta: float
    next_cka: np.ndarray  # [len(lambdas), L + 1]: CKA(theta(lam), theta(lam + delta)); NaN where lam + delta > 1
    instruct_cka: np.ndarray  # [len(lambdas), L + 1]: CKA(theta(lam), theta_I)
    thinking_cka: np.ndarray  # [len(lambdas), L + 1]: CKA(theta(lam), theta_T)


def representation_continuity(
    pair: ModelPair, sequences: Sequence[Sequence[int]], lambdas: Sequence[float], delta: float = 0.05, progress: bool = True
) -> Continuity:
    """Per-layer CKA along the path. theta(lam + delta) is only formed inside [0, 1] (or up to the
    largest lambda asked for, when that lies beyond 1), so the last row never compares a model with itself."""
    tokens, mask = right_pad(sequences, pair.cfg.pad_token_id)
    top = max(1.0, *lambdas)

    def states(lam):
        theta = interpolate(pair.instruct, pair.thinking, lam, extrapolate=True)
        return hidden_states(theta, pair.cfg, jnp.asarray(tokens))[:, mask]  # [L + 1, real tokens, D]

    ends = states(0.0), states(1.0)
    rows: dict[str, list[np.ndarray]] = {"next": [], "instruct": [], "thinking": []}
    for lam in tqdm(lambdas, desc="continuity", unit="lambda", disable=not progress):
        here = states(lam)
        beyond = lam + delta > top + 1e-9
        rows["next"].append(np.full(here.shape[0], np.nan) if beyond else np.asarray(_cka_per_layer(here, states(lam + delta))))
        rows["instruct"].append(np.asarray(_cka_per_layer(here, ends[0])))
        rows["thinking"].append(np.asarray(_cka_per_layer(here, ends[1])))
    return Continuity(tuple(lambdas), delta, *(np.stack(rows[k]) for k in ("next", "instruct", "thinking")))


sequence_loss = jax.jit(next_token_loss, static_argnums=1)


@dataclasses.dataclass(frozen=True)
class Connectivity:
    lambdas: tuple[float, ...]
    losses: np.ndarray  # held-out loss of theta(lam)
    linear: np.ndarray  # (1 - lam) * loss(0) + lam * loss(1)

    @property
    def barrier(self) -> float:
        """Largest excess of the path loss over the straight line (<= 0: no barrier)."""
        return float(np.max(self.losses - self.linear))


def loss_along_path(
    pair: ModelPair,
    sequences: Sequence[Sequence[int]],
    loss_masks: Sequence[Sequence[bool]],
    lambdas: Sequence[float],
    progress: bool = True,
) -> Connectivity:
    tokens, real = right_pad(sequences, pair.cfg.pad_token_id)
    weights = np.zeros_like(real)
    for i, m in enumerate(loss_masks):
        weights[i, : len(m)] = m
    weights &= real
    lambdas = tuple(sorted(set(lambdas) | {0.0, 1.0}))
    losses = np.array([
        float(sequence_loss(interpolate(pair.instruct, pair.thinking, lam, extrapolate=True), pair.cfg, tokens, weights))
        for lam in tqdm(lambdas, desc="connectivity", unit="lambda", disable=not progress)
    ])  # fmt: skip
    lam = np.array(lambdas)
    return Connectivity(lambdas, losses, (1 - lam) * losses[0] + lam * losses[-1])
