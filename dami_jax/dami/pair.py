"""An Instruct / Thinking checkpoint pair of one architecture: the two ends of DAMI's path."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from dami_jax.dami.interpolation import check_compatible
from dami_jax.errors import InputError
from dami_jax.models.checkpoint import load_checkpoint
from dami_jax.models.config import ModelConfig
from dami_jax.models.params import Params, fingerprint
from dami_jax.models.pinned import PINNED_PAIRS
from dami_jax.models.tokenizer import load_tokenizer


# Whose chat template renders a prompt at lambda: "thinking" (it opens the think block, so closing
# it measures when explicit thinking switches on), "instruct", or "nearest" (the closer endpoint's).
TEMPLATES = ("thinking", "instruct", "nearest")


def template_for(rule: str, lam: float) -> str:
    """The endpoint ("instruct" or "thinking") whose chat template renders a prompt at ``lam``
    under ``rule`` (one of :data:`TEMPLATES`): sweeps, route-eval and the HTTP server all use it."""
    if rule not in TEMPLATES:
        raise InputError(f"template must be one of {TEMPLATES}, got {rule!r}")
    if rule == "nearest":
        return "instruct" if lam < 0.5 else "thinking"
    return rule


@dataclasses.dataclass(frozen=True)
class ModelPair:
    cfg: ModelConfig
    instruct: Params  # theta_I, lambda = 0
    thinking: Params  # theta_T, lambda = 1
    tokenizers: dict[str, Any]  # "instruct" / "thinking": each checkpoint's own chat template
    paths: dict[str, str]

    def fingerprints(self) -> dict[str, str]:
        """Content hashes of both endpoints (:func:`dami_jax.models.params.fingerprint`)."""
        return {"instruct": fingerprint(self.instruct), "thinking": fingerprint(self.thinking)}


def load_pair(
    instruct: str | Path, thinking: str | Path | None = None, dtype: Any = None, mesh: jax.sharding.Mesh | None = None
) -> ModelPair:
    """Load both checkpoints and check that they can be interpolated (same shapes, same vocab).

    ``instruct`` and ``thinking`` are HF folders; or ``instruct`` alone names a pinned pair
    (:data:`dami_jax.models.pinned.PINNED_PAIRS`: ``"smollm2-systems"``, our System 1 and System 2
    fine-tunes of SmolLM2-135M-Instruct; ``"smollm2"``, SmolLM2-135M-Instruct and our Thinking
    fine-tune of it), whose folders are converted or merged on first use and cached."""
    if thinking is None:
        if instruct not in PINNED_PAIRS:
            raise InputError(f"load_pair: give a Thinking folder beside {instruct}, or name a pinned pair ({', '.join(PINNED_PAIRS)})")
        instruct, thinking = (folder() for folder in PINNED_PAIRS[str(instruct)])
    cfg_i, theta_i = load_checkpoint(instruct, dtype=dtype, mesh=mesh)
    cfg_t, theta_t = load_checkpoint(thinking, dtype=dtype, mesh=mesh)
    same_shape = dataclasses.replace(cfg_t, eos_token_ids=cfg_i.eos_token_ids, pad_token_id=cfg_i.pad_token_id)
    if same_shape != cfg_i:
        differ = [f"{f.name} {getattr(cfg_i, f.name)} vs {getattr(same_shape, f.name)}"
                  for f in dataclasses.fields(cfg_i) if getattr(cfg_i, f.name) != getattr(same_shape, f.name)]  # fmt: skip
        raise InputError(f"{instruct} and {thinking} are not the same architecture ({'; '.join(differ)})")
    check_compatible(theta_i, theta_t, (str(instruct), str(thinking)))
    tokenizers = {"instruct": load_tokenizer(instruct), "thinking": load_tokenizer(thinking)}
    if tokenizers["instruct"].get_vocab() != tokenizers["thinking"].get_vocab():
        raise InputError(f"{instruct} and {thinking} have different vocabularies: token ids would not line up")
    # Stop on either model's end-of-turn tokens: interpolated models may emit either.
    cfg = dataclasses.replace(cfg_i, eos_token_ids=tuple(dict.fromkeys(cfg_i.eos_token_ids + cfg_t.eos_token_ids)))
    return ModelPair(cfg, theta_i, theta_t, tokenizers, {"instruct": str(instruct), "thinking": str(thinking)})
