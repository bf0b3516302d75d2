"""TailorKV offline layer identification: which layers get a quantized KV cache (dense attention)
and which get the offloaded top-k cache (sparse attention).

The dense preference score of a layer is the attention mass that falls *outside* each query's
top ``alpha`` fraction of keys, averaged over the last ``last_q`` queries of a calibration prefill
and over query heads. Dense layers (score > tau) lose a lot when tokens are dropped but tolerate
low-bit quantization; sparse layers are the opposite. The split is computed once per model and
stored as JSON; the splits the authors published are built in for the models they studied.
"""

from __future__ import annotations

import dataclasses
import json
import re
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dami_jax.errors import InputError
from dami_jax.files import write_atomic
from dami_jax.models.config import ModelConfig
from dami_jax.models.model import observe_layers
from dami_jax.models.params import Params

ALPHA = 0.05  # top fraction of keys kept per query row
LAST_Q = 32  # queries scored, from the end of the calibration prompt
TAU = 0.2  # score above which a layer is dense (quantization-friendly)
PROFILE_FILE = "layer_profile.json"

# The published splits (quantized = dense layers), keyed by normalize_model_name(hub name): the
# models of the reference code's config/model2quantlayer.json (ydyhello/TailorKV), which the paper
# reports. Its AWQ int4 checkpoints are left out (not loadable here). Any other model is profiled:
# a split is never carried over to a model it was not measured on.
BUILTIN_SPLITS: dict[str, tuple[int, ...]] = {
    "metallama318binstruct": (0,),  # NousResearch/Meta-Llama-3.1-8B-Instruct (the reference's copy)
    "llama318binstruct": (0,),  # meta-llama/Llama-3.1-8B-Instruct: the same weights, renamed on the hub
    "llama27b32kinstruct": (0, 1),  # togethercomputer/Llama-2-7B-32K-Instruct
    "yi6b200k": (0, 1),  # 01-ai/Yi-6B-200K
    "yi9b200k": (0, 1),  # 01-ai/Yi-9B-200K
    "mistral7binstructv03": (0,),  # mistralai/Mistral-7B-Instruct-v0.3
}


class MissingProfileError(InputError, LookupError):
    """A model with no saved layer profile and no built-in split."""


def _check_fraction(name: str, value: float, low_open: bool) -> None:
    number = isinstance(value, (int, float))
    if not (number and ((0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0))):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def classify(scores: Sequence[float], tau: float) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(dense layers, sparse layers): dense where score > tau."""
    _check_fraction("tau", tau, low_open=False)
    dense = tuple(i for i, s in enumerate(scores) if s > tau)
    return dense, tuple(i for i in range(len(scores)) if i not in dense)


@dataclasses.dataclass(frozen=True)
class LayerProfile:
    """Per-layer dense preference scores and the resulting cache split.

    ``dense_layers`` are stored rather than derived so that a hand-edited JSON (an override of
    the threshold rule, as the reference code's per-model JSON allows) is honoured on load.
    """

    scores: tuple[float, ...]
    tau: float
    dense_layers: tuple[int, ...]  # quantization-friendly: quantized KV cache
    sparse_layers: tuple[int, ...]  # sparsity-friendly: offloaded cache, top-k retrieval
    alpha: float = ALPHA
    last_q: int = LAST_Q
    num_tokens: int = 0
    model: str = ""
    calibration: str = ""

    def __post_init__(self) -> None:
        _check_fraction("tau", self.tau, low_open=False)
        _check_fraction("alpha", self.alpha, low_open=True)
        layers = sorted(self.dense_layers + self.sparse_layers)
        if layers != list(range(len(self.scores))):
            raise ValueError(
                f"dense_layers {self.dense_layers} and sparse_layers {self.sparse_layers} must split "
                f"layers 0..{len(self.scores) - 1} with no overlap"
            )

    @property
    def num_layers(self) -> int:
        return len(self.scores)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "num_layers": self.num_layers}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LayerProfile":
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = {"scores", "tau", "dense_layers", "sparse_layers"} - data.keys()
        if missing:
            raise ValueError(f"layer profile JSON lacks field(s) {sorted(missing)}")
        kw = {k: v for k, v in data.items() if k in fields}
        kw["scores"] = tuple(float(s) for s in kw["scores"])
        kw["dense_layers"] = tuple(int(i) for i in kw["dense_layers"])
        kw["sparse_layers"] = tuple(int(i) for i in kw["sparse_layers"])
        return cls(**kw)

    def save(self, path: str | Path) -> Path:
        return write_atomic(path, json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LayerProfile":
        path = Path(path)
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (json.JSONDecodeError, ValueError, TypeError) as e:
            raise InputError(f"{path}: not a valid layer profile ({e})") from None


# --- scores -------------------------------------------------------------------------------------


def _outside_top_k_mass(q: jax.Array, k: jax.Array, top_k: int) -> jax.Array:
    """Mean attention mass outside the top_k keys of each row.

    q: the last n rotated queries [B, n, Hq, hd] of a length-T prompt; k: [B, T, Hkv, hd].
    Only these n rows are formed (n x T), never the full T x T matrix. No causal mask, as in the
    reference code (its score is softmax(Q_last K^T / sqrt(d)) over all T keys): each of the n
    queries also weighs the up to n - 1 keys after it, and the published splits were measured so.
    """
    b, n, hq, hd = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, n, hkv, hq // hkv, hd)  # query head h reads KV head h // (Hq / Hkv)
    logits = jnp.einsum("bnhgd,bshd->bhgns", qg, k, preferred_element_type=jnp.float32) * hd**-0.5
    probs = jax.nn.softmax(logits, axis=-1)
    kept = jax.lax.top_k(probs, top_k)[0].sum(-1)
    return jnp.mean(1.0 - kept)


@partial(jax.jit, static_argnames=("cfg", "last_q", "top_k"))
def _scores(params: Params, cfg: ModelConfig, tokens: jax.Array, last_q: int, top_k: int) -> jax.Array:
    """One prefill; per layer, the score from the rotated q and k the layer itself computes."""
    return jnp.stack(observe_layers(params, cfg, tokens, lambda view: _outside_top_k_mass(view.q[:, -last_q:], view.k, top_k)))


def dense_preference_scores(
    params: Params, cfg: ModelConfig, tokens: Any, alpha: float = ALPHA, last_q: int = LAST_Q
) -> np.ndarray:
    """float64 [num_layers] scores in [0, 1] for int tokens [T] or [B, T] (no padding); the last
    ``last_q`` queries attend to all T keys, unmasked (see :func:`_outside_top_k_mass`)."""
    _check_fraction("alpha", alpha, low_open=True)
    if not isinstance(last_q, int) or last_q < 1:
        raise ValueError(f"last_q must be a positive int, got {last_q!r}")
    tokens = jnp.asarray(tokens, jnp.int32)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be a non-empty [T] or [B, T] array, got shape {tokens.shape}")
    seq_len = tokens.shape[1]
    top_k = max(1, int(alpha * seq_len))
    return np.asarray(_scores(params, cfg, tokens, min(last_q, seq_len), top_k), np.float64)


def profile_layers(
    params: Params,
    cfg: ModelConfig,
    tokens: Any,
    alpha: float = ALPHA,
    last_q: int = LAST_Q,
    tau: float = TAU,
    model: str = "",
    calibration: str = "",
) -> LayerProfile:
    """Score every layer on a calibration prefill and split at ``tau``."""
    _check_fraction("tau", tau, low_open=False)
    scores = tuple(float(s) for s in dense_preference_scores(params, cfg, tokens, alpha, last_q))
    dense, sparse = classify(scores, tau)
    num_tokens = int(np.shape(tokens)[-1])
    return LayerProfile(scores, tau, dense, sparse, alpha, last_q, num_tokens, model, calibration)


# --- lookup ---------------------------------------------------------------------------------------


def model_names(model_name_or_path: str | Path) -> list[str]:
    """Names a model goes by: the folder (or hub) name, then its config's recorded name."""
    names = [str(model_name_or_path).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]]
    config = Path(model_name_or_path) / "config.json"
    if config.is_file():
        hf = json.loads(config.read_text())
        names += [str(hf[k]) for k in ("_name_or_path", "_model_name_or_path") if hf.get(k)]
    return names


def normalize_model_name(name: str) -> str:
    """'meta-llama/Llama-3.1-8B-Instruct' -> 'llama318binstruct' (last path part, alphanumerics)."""
    last = name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^a-z0-9]", "", last.lower())


def quantized_layers_for(
    model_name_or_path: str | Path, num_layers: int, profile_path: str | Path | None = None
) -> tuple[int, ...]:
    """The dense (to-be-quantized) layers of a model.

    Order: ``profile_path``; else ``<model folder>/layer_profile.json``; else the published
    splits (:data:`BUILTIN_SPLITS`) by normalised name; else MissingProfileError saying how to
    make a profile.
    """
    folder_profile = Path(model_name_or_path) / PROFILE_FILE
    if profile_path is None and folder_profile.is_file():
        profile_path = folder_profile
    if profile_path is not None:
        profile = LayerProfile.load(profile_path)
        if profile.num_layers != num_layers:
            raise InputError(f"{profile_path}: profile has {profile.num_layers} layers, the model has {num_layers}")
        return profile.dense_layers
    names = model_names(model_name_or_path)
    for name in names:
        layers = BUILTIN_SPLITS.get(normalize_model_name(name))
        if layers is not None:
            if max(layers) >= num_layers:
                raise InputError(f"built-in split {layers} for {name!r} does not fit a {num_layers}-layer model")
            return layers
    raise MissingProfileError(
        f"no layer profile for model {str(model_name_or_path)!r} (known as {names}) and no built-in split; write one "
        f"with `dami-jax profile-layers {model_name_or_path} --out {model_name_or_path}` ({PROFILE_FILE} in the model "
        f"folder is found by itself), or pass profile_path. Built-in splits: {sorted(BUILTIN_SPLITS)}"
    )


# --- reporting --------------------------------------------------------------------------------------


def format_profile(profile: LayerProfile) -> str:
    """Per-layer table plus the split, for the CLI."""
    dense = set(profile.dense_layers)
    lines = [f"{'layer':>5}  {'score':>6}  class"]
    for i, s in enumerate(profile.scores):
        lines.append(f"{i:5d}  {s:6.3f}  {'dense (quantize)' if i in dense else 'sparse (offload + top-k)'}")
    lines.append(
        f"tau={profile.tau:g} alpha={profile.alpha:g} last_q={profile.last_q} tokens={profile.num_tokens}: "
        f"dense layers {list(profile.dense_layers)}, {len(profile.sparse_layers)} sparse layers"
    )
    return "\n".join(lines)
