"""Pilot-study diagnostics of the interpolation path (ours; the DAMI paper only names them):

- representation continuity: linear CKA of per-layer hidden states between theta(lam) and
  theta(lam + delta), and against both endpoints;
- structural connectivity: held-out loss along the path against the straight line between the
  endpoint losses; the largest excess is the loss barrier (about 0 for linearly connected models).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dami_jax.config import ModelConfig
from dami_jax.interpolation import interpolate
from dami_jax.model import block, causal_positions, decoder, embed, lm_logits
from dami_jax.pair import ModelPair
from dami_jax.params import Params


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (int32 [B, T], bool [B, T] real-token mask). Right padding is exact for a
    causal pass without cache: pads come after every real token."""
    width = max(map(len, sequences))
    tokens = np.full((len(sequences), width), pad_id, np.int32)
    mask = np.zeros((len(sequences), width), bool)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)], mask[i, : len(s)] = s, True
    return tokens, mask


@partial(jax.jit, static_argnums=1)
def hidden_states(params: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """float32 [L + 1, B, T, D]: the embedding output, then each layer's residual stream."""
    h, positions = embed(params, tokens), causal_positions(tokens)
    states = [h]
    for i, layer in enumerate(params["layers"]):
        h, _ = block(layer, cfg, h, positions, i, None)
        states.append(h)
    return jnp.stack(states)


def linear_cka(x: jax.Array, y: jax.Array) -> jax.Array:
    """Linear CKA (Kornblith et al. 2019) of two representations x [n, d1], y [n, d2] of the same n items."""
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    cross = jnp.sum((y.T @ x) ** 2)
    return cross / (jnp.linalg.norm(x.T @ x) * jnp.linalg.norm(y.T @ y))


def _token_states(params, cfg, tokens, mask) -> jax.Array:
    """[L + 1, n_real_tokens, D]: states of the real (non-pad) tokens only."""
    return hidden_states(params, cfg, jnp.asarray(tokens))[:, mask]


@dataclasses.dataclass(frozen=True)
class Continuity:
    lambdas: tuple[float, ...]
    delta: float
    next_cka: np.ndarray  # [len(lambdas), L + 1]: CKA(theta(lam), theta(lam + delta)) per layer
    instruct_cka: np.ndarray  # [len(lambdas), L + 1]: CKA(theta(lam), theta_I)
    thinking_cka: np.ndarray  # [len(lambdas), L + 1]: CKA(theta(lam), theta_T)


def representation_continuity(
    pair: ModelPair, sequences: Sequence[Sequence[int]], lambdas: Sequence[float], delta: float = 0.05
) -> Continuity:
    tokens, mask = right_pad(sequences, pair.cfg.pad_token_id)

    def states(lam):
        return _token_states(interpolate(pair.instruct, pair.thinking, lam, extrapolate=True), pair.cfg, tokens, mask)

    def cka_per_layer(a, b):
        return np.array([float(linear_cka(a[i], b[i])) for i in range(a.shape[0])])

    ends = states(0.0), states(1.0)
    rows = {"next": [], "instruct": [], "thinking": []}
    for lam in lambdas:
        here = states(lam)
        rows["next"].append(cka_per_layer(here, states(min(lam + delta, 1.0))))
        rows["instruct"].append(cka_per_layer(here, ends[0]))
        rows["thinking"].append(cka_per_layer(here, ends[1]))
    return Continuity(tuple(lambdas), delta, *(np.stack(rows[k]) for k in ("next", "instruct", "thinking")))


@partial(jax.jit, static_argnums=1)
def sequence_loss(params: Params, cfg: ModelConfig, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over positions where ``loss_mask`` marks the *target* token."""
    hidden, _ = decoder(params, cfg, tokens)
    logits = lm_logits(params, hidden)[:, :-1]
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    weight = loss_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)


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
    pair: ModelPair, sequences: Sequence[Sequence[int]], loss_masks: Sequence[Sequence[bool]], lambdas: Sequence[float]
) -> Connectivity:
    tokens, real = right_pad(sequences, pair.cfg.pad_token_id)
    weights = np.zeros_like(real)
    for i, m in enumerate(loss_masks):
        weights[i, : len(m)] = m
    weights &= real
    lambdas = tuple(sorted(set(lambdas) | {0.0, 1.0}))
    losses = np.array(
        [float(sequence_loss(interpolate(pair.instruct, pair.thinking, lam), pair.cfg, tokens, weights)) for lam in lambdas]
    )
    lam = np.array(lambdas)
    return Connectivity(lambdas, losses, (1 - lam) * losses[0] + lam * losses[-1])


def plot_diagnostics(continuity: Continuity, connectivity: Connectivity, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, data, title in (
        (axes[0], continuity.next_cka, f"CKA(theta(lam), theta(lam+{continuity.delta:g}))"),
        (axes[1], continuity.instruct_cka - continuity.thinking_cka, "CKA to Instruct - CKA to Thinking"),
    ):
        image = ax.imshow(data.T, aspect="auto", origin="lower", cmap="viridis",
                          extent=(continuity.lambdas[0], continuity.lambdas[-1], -0.5, data.shape[1] - 0.5))  # fmt: skip
        fig.colorbar(image, ax=ax)
        ax.set_xlabel("lambda")
        ax.set_ylabel("layer (0 = embeddings)")
        ax.set_title(title, fontsize=10)
    ax = axes[2]
    ax.plot(connectivity.lambdas, connectivity.losses, "o-", label="held-out loss of theta(lam)")
    ax.plot(connectivity.lambdas, connectivity.linear, "--", color="gray", label="straight line between endpoints")
    ax.set_xlabel("lambda")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"connectivity: barrier {connectivity.barrier:+.3f}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
