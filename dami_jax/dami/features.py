"""Query features for DAMI-Pref: what the Instruct model's prefill says about a query (ours).

A router must decide before anything is generated, so its input is one causal pass of the
Instruct model over the rendered prompt: the residual stream of a few layers, pooled over the
prompt's tokens (mean) and at its last token. The pass runs the model's own layer loop
(:func:`dami_jax.models.model.observe_layers`), right-padded (exact for a causal pass: pads come
after every real token) and bucketed to a multiple of ``BUCKET`` tokens to bound recompiles.

:class:`FeatureStore` keeps computed features on disk per (model fingerprint, feature spec,
query id), so training epochs, reruns and evaluations never prefill the same query twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dami_jax.dami.diagnostics import right_pad
from dami_jax.files import write_atomic
from dami_jax.models.config import ModelConfig
from dami_jax.models.model import observe_layers
from dami_jax.models.params import Params

BUCKET = 32
LAYER_NAMES = ("middle", "final")
POOLS = ("mean", "last")


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """Which layers' residual streams, pooled how. ``layers``: "middle", "final" or layer indices."""

    layers: tuple[str | int, ...] = ("middle", "final")
    pools: tuple[str, ...] = ("mean", "last")

    def __post_init__(self):
        bad = [x for x in self.layers if not (isinstance(x, int) or x in LAYER_NAMES)]
        if bad or not self.layers:
            raise ValueError(f"FeatureSpec.layers: need layer indices or {LAYER_NAMES}, got {self.layers!r}")
        if not self.pools or any(p not in POOLS for p in self.pools):
            raise ValueError(f"FeatureSpec.pools: need some of {POOLS}, got {self.pools!r}")

    def layer_indices(self, cfg: ModelConfig) -> tuple[int, ...]:
        named = {"middle": cfg.num_layers // 2 - 1 if cfg.num_layers > 1 else 0, "final": cfg.num_layers - 1}
        indices = tuple(named[x] if isinstance(x, str) else x for x in self.layers)
        if any(not 0 <= i < cfg.num_layers for i in indices):
            raise ValueError(f"FeatureSpec.layers {self.layers}: the model has layers 0..{cfg.num_layers - 1}")
        return indices

    def dim(self, cfg: ModelConfig) -> int:
        return len(self.layers) * len(self.pools) * cfg.hidden_size

    def to_json(self) -> dict:
        return {"layers": list(self.layers), "pools": list(self.pools)}

    @classmethod
    def from_json(cls, data: dict) -> "FeatureSpec":
        return cls(tuple(data["layers"]), tuple(data["pools"]))

    @property
    def key(self) -> str:
        return hashlib.sha256(repr(self.to_json()).encode()).hexdigest()[:8]


@partial(jax.jit, static_argnames=("cfg", "layers", "pools"))
def _pooled(params: Params, tokens: jax.Array, mask: jax.Array, *, cfg: ModelConfig, layers: tuple[int, ...], pools: tuple[str, ...]) -> jax.Array:
    """tokens int32 [B, T] right-padded, mask bool [B, T] -> float32 [B, layers * pools * D]."""
    outputs = observe_layers(params, cfg, tokens, lambda view: view.output if view.index in layers else None)
    weights = mask.astype(jnp.float32)
    last = jnp.sum(mask, axis=1) - 1
    pieces = []
    for i in layers:
        h = outputs[i]
        for pool in pools:
            if pool == "mean":
                pieces.append(jnp.sum(h * weights[..., None], axis=1) / jnp.sum(weights, axis=1, keepdims=True))
            else:
                pieces.append(jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0])
    return jnp.concatenate(pieces, axis=-1)


def query_features(
    params: Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], spec: FeatureSpec = FeatureSpec(),
    *, batch_size: int = 32, progress: bool = False,
) -> np.ndarray:
    """float32 [N, spec.dim(cfg)]: one feature row per prompt (token-id lists), in order."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: need at least one prompt, and every prompt needs at least one token")
    layers = spec.layer_indices(cfg)
    rows = []
    for lo in tqdm(range(0, len(prompts), batch_size), desc="features", unit="batch", disable=not progress):
        batch = list(prompts[lo : lo + batch_size])
        tokens, mask = right_pad(batch, cfg.pad_token_id, multiple=BUCKET)
        out = _pooled(params, jnp.asarray(tokens), jnp.asarray(mask), cfg=cfg, layers=layers, pools=spec.pools)
        rows.append(np.asarray(out))
    return np.concatenate(rows)


class FeatureStore:
    """Features on disk, one ``.npz`` per (model fingerprint, feature spec): ``ids`` and ``features``.

    :meth:`get` computes only the queries it has not stored yet and rewrites the file atomically,
    so an interrupted run keeps what it had.
    """

    def __init__(self, folder: str | Path, fingerprint: str, spec: FeatureSpec):
        self.path = Path(folder) / f"features-{fingerprint}-{spec.key}.npz"

    def _load(self) -> dict[str, np.ndarray]:
        if not self.path.is_file():
            return {}
        with np.load(self.path) as data:
            return dict(zip(data["ids"].tolist(), data["features"]))

    def get(self, ids: Sequence[str], compute: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """float32 [len(ids), F] for ``ids``; ``compute(missing ids)`` fills in the rest."""
        stored = self._load()
        missing = [i for i in dict.fromkeys(ids) if i not in stored]
        if missing:
            stored.update(zip(missing, compute(missing)))
            buffer = io.BytesIO()
            np.savez(buffer, ids=np.asarray(list(stored)), features=np.stack(list(stored.values())))
            write_atomic(self.path, buffer.getvalue())
        return np.stack([stored[i] for i in ids]).astype(np.float32)
