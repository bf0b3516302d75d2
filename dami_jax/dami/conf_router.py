"""DAMI-Conf: a zero-shot router from System 1's confidence and the two systems' disagreement.

The paper's zero-shot estimator is "confidence-based, using the cognitive discrepancy between the
two models"; the signals and the map below are ours.

1. System 1 drafts: the Instruct model answers the query greedily, with a short budget.
2. Both endpoint models score that draft by teacher forcing (:mod:`dami_jax.decoding.scoring`).
   *Confidence* is the mean probability the Instruct model gave the draft's tokens;
   *discrepancy* is the mean per-token Jensen-Shannon divergence (in bits, so in [0, 1]) between
   the two models' next-token distributions along the draft.
3. :class:`ConfMap` turns them into a lambda: risk = conf_weight * (1 - confidence) +
   disc_weight * discrepancy. Below ``accept_below`` the draft itself is the answer (lambda 0,
   nothing more is generated); otherwise lambda = clip(risk, floor, 1), rounded up to the grid
   (erring towards more reasoning). The map is monotone: less confidence or more disagreement
   never lowers lambda. The draft's tokens count in the cost either way.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dami_jax.dami.pair import ModelPair
from dami_jax.decoding.generation import generate
from dami_jax.decoding.scoring import teacher_forced_logprobs


def js_divergence_bits(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """Jensen-Shannon divergence over the last axis, in bits (0 = same distribution, 1 = disjoint)."""
    logm = jnp.logaddexp(logp, logq) - jnp.log(2.0)
    kl = lambda a: jnp.sum(jnp.exp(a) * (a - logm), axis=-1)
    return jnp.maximum(0.5 * (kl(logp) + kl(logq)), 0.0) / jnp.log(2.0)


@jax.jit
def _signals(lp_instruct, lp_thinking, forced, lengths) -> tuple[jax.Array, jax.Array]:
    """Masked means along each draft: (confidence [B], discrepancy [B])."""
    mask = (jnp.arange(forced.shape[1])[None, :] < lengths[:, None]).astype(jnp.float32)
    token_prob = jnp.exp(jnp.take_along_axis(lp_instruct, forced[..., None], axis=-1)[..., 0])
    mean = lambda x: jnp.sum(x * mask, axis=1) / jnp.sum(mask, axis=1)
    return mean(token_prob), mean(js_divergence_bits(lp_instruct, lp_thinking))


@dataclasses.dataclass(frozen=True)
class DraftSignals:
    drafts: list[list[int]]  # each query's greedy Instruct answer (token ids, stop token included)
    confidence: np.ndarray  # float32 [N]: mean token probability of the draft under Instruct
    discrepancy: np.ndarray  # float32 [N]: mean per-token JS divergence (bits), Instruct vs Thinking

    @property
    def draft_tokens(self) -> np.ndarray:
        return np.asarray([len(d) for d in self.drafts], np.int32)


def draft_signals(
    pair: ModelPair, prompts: Sequence[Sequence[int]], *, max_draft_tokens: int = 64, batch_size: int = 32
) -> DraftSignals:
    """Draft each prompt (token-id lists) with the Instruct model and score the drafts with both."""
    drafts, confidence, discrepancy = [], [], []
    for lo in range(0, len(prompts), batch_size):
        batch = [list(p) for p in prompts[lo : lo + batch_size]]
        rows = generate(pair.instruct, pair.cfg, batch, max_new_tokens=max_draft_tokens).token_lists()  # >= 1 token each
        width = max(map(len, rows))
        forced = np.asarray([row + [pair.cfg.pad_token_id] * (width - len(row)) for row in rows], np.int32)
        lp = {name: teacher_forced_logprobs(params, pair.cfg, batch, forced)
              for name, params in (("instruct", pair.instruct), ("thinking", pair.thinking))}  # fmt: skip
        conf, disc = _signals(lp["instruct"], lp["thinking"], jnp.asarray(forced), jnp.asarray([len(r) for r in rows]))
        drafts += rows
        confidence.append(np.asarray(conf))
        discrepancy.append(np.asarray(disc))
    return DraftSignals(drafts, np.concatenate(confidence), np.concatenate(discrepancy))


@dataclasses.dataclass(frozen=True)
class ConfMap:
    """The monotone map from (confidence, discrepancy) to lambda (see the module docstring)."""

    conf_weight: float = 1.0
    disc_weight: float = 1.0
    accept_below: float = 0.1  # risk below which the draft is the answer
    floor: float = 0.5  # the least lambda a query that is not answered by its draft gets

    def __post_init__(self):
        values = dataclasses.asdict(self)
        if any(not np.isfinite(v) or v < 0 for v in values.values()) or self.floor > 1:
            raise ValueError(f"ConfMap: weights and thresholds must be finite and >= 0, floor <= 1; got {values}")

    def risk(self, confidence: np.ndarray, discrepancy: np.ndarray) -> np.ndarray:
        return self.conf_weight * (1.0 - np.asarray(confidence)) + self.disc_weight * np.asarray(discrepancy)

    def route(self, confidence: np.ndarray, discrepancy: np.ndarray, grid: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """(lambda float32 [N], accept bool [N]: the draft is the answer, lambda 0)."""
        grid = np.sort(np.asarray(grid, np.float32))
        risk = self.risk(confidence, discrepancy)
        accept = risk < self.accept_below
        wanted = np.clip(risk, self.floor, 1.0)
        above = np.minimum(np.searchsorted(grid, wanted - 1e-6), len(grid) - 1)  # the nearest grid value >= wanted
        return np.where(accept, 0.0, grid[above]).astype(np.float32), accept
