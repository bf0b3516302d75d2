"""Model configuration: one frozen, hashable dataclass read from an HF ``config.json``.

Being hashable lets the config ride along as a static argument of ``jax.jit``.
Both transformers config styles are accepted: v4 (``rope_theta`` + ``rope_scaling``, as hub
checkpoints ship them) and v5 (``rope_parameters``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from dami_jax.errors import InputError

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(InputError):
    """A ``config.json`` that dami-jax cannot serve faithfully."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # one of SUPPORTED_ROPE_TYPES
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inverse_frequencies(self, head_dim: int) -> np.ndarray:
        """float32[head_dim // 2], computed in float64 as transformers does, then rounded."""
        inv_freq = 1.0 / self.theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim)
        inv_freq = inv_freq.astype(np.float64)
        if self.type == "linear":
            inv_freq = inv_freq / self.factor
        elif self.type == "llama3":
            old_context = self.original_max_position_embeddings
            low_freq_wavelen = old_context / self.low_freq_factor
            high_freq_wavelen = old_context / self.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
            smooth = (old_context / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
            inv_freq = np.where(is_medium, smoothed, scaled)
        return inv_freq.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer shape and numerics (Llama / Qwen2 / Qwen3 / Qwen3-MoE family).

    Mixture of experts (``num_experts`` > 0): layer i routes each token to ``experts_per_token``
    of ``num_experts`` MLPs of ``moe_intermediate_size`` unless it is in ``mlp_only_layers`` or
    (i + 1) is not a multiple of ``decoder_sparse_step``; such layers keep one MLP of
    ``intermediate_size``."""

    architecture: str  # "llama" | "qwen2" | "qwen3" | "qwen3_moe"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Llama/Qwen3 option: biases on q, k, v and o
    max_position_embeddings: int = 4096
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalize the chosen experts' router probabilities to sum to 1
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def qkv_bias(self) -> bool:
        return self.architecture == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @property
    def qk_norm(self) -> bool:
        """Qwen3: RMSNorm over head_dim on q and k before RoPE."""
        return self.architecture in ("qwen3", "qwen3_moe")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelConfig":
        data = dict(data)
        data["rope"] = RopeConfig(**data["rope"])
        data["eos_token_ids"] = tuple(data["eos_token_ids"])
        data["mlp_only_layers"] = tuple(data.get("mlp_only_layers", ()))
        return cls(**data)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The transformers-v5 ``config.json`` for ``cfg`` (inverse of :func:`config_from_hf`)."""
    arch = {v: k for k, v in ARCHITECTURES.items()}[cfg.architecture]
    rope: dict[str, Any] = {"rope_theta": cfg.rope.theta, "rope_type": cfg.rope.type}
    if cfg.rope.type != "default":
        rope["factor"] = cfg.rope.factor
    if cfg.rope.type == "llama3":
        rope.update(
            low_freq_factor=cfg.rope.low_freq_factor,
            high_freq_factor=cfg.rope.high_freq_factor,
            original_max_position_embeddings=cfg.rope.original_max_position_embeddings,
        )
    eos = list(cfg.eos_token_ids)
    experts = {} if not cfg.num_experts else {
        "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.experts_per_token, "moe_intermediate_size": cfg.moe_intermediate_size,
        "norm_topk_prob": cfg.norm_topk_prob, "decoder_sparse_step": cfg.decoder_sparse_step, "mlp_only_layers": list(cfg.mlp_only_layers),
    }  # fmt: skip
    return {
        "architectures": [arch],
        "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "max_position_embeddings": cfg.max_position_embeddings,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": cfg.pad_token_id,
        **experts,
    }


def _rope_from_hf(hf: dict[str, Any], where: str) -> RopeConfig:
    """Accept v5 ``rope_parameters`` or v4 ``rope_theta`` + ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or {})
    if "rope_theta" not in params:
        params.update(hf.get("rope_scaling") or {})
        params["rope_theta"] = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{where}: rope type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
    defaults = RopeConfig()
    return RopeConfig(
        theta=float(params["rope_theta"]),
        type=rope_type,
        factor=float(params.get("factor", defaults.factor)),
        low_freq_factor=float(params.get("low_freq_factor", defaults.low_freq_factor)),
        high_freq_factor=float(params.get("high_freq_factor", defaults.high_freq_factor)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", defaults.original_max_position_embeddings)
        ),
    )


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def _experts_from_hf(hf: dict[str, Any], arch: str, where: str) -> dict[str, Any]:
    """The mixture-of-experts fields of a ``qwen3_moe`` config (v4 ``num_experts``, v5
    ``num_local_experts``); {} for the dense architectures."""
    if arch != "qwen3_moe":
        return {}
    fields = dict(
        num_experts=int(hf["num_local_experts"] if "num_local_experts" in hf else hf["num_experts"]),
        experts_per_token=int(hf["num_experts_per_tok"]), moe_intermediate_size=int(hf["moe_intermediate_size"]),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)), decoder_sparse_step=int(hf.get("decoder_sparse_step", 1)),
        mlp_only_layers=tuple(int(i) for i in hf.get("mlp_only_layers") or ()),
    )  # fmt: skip
    if not 1 <= fields["experts_per_token"] <= fields["num_experts"]:
        raise ConfigError(f"{where}: num_experts_per_tok={fields['experts_per_token']} must be between 1 and the {fields['num_experts']} experts")
    if fields["decoder_sparse_step"] < 1:
        raise ConfigError(f"{where}: decoder_sparse_step={fields['decoder_sparse_step']} must be >= 1")
    return fields


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Translate an HF config dict; ``where`` names the source in error messages."""
    archs = hf.get("architectures") or []
    known = [a for a in archs if a in ARCHITECTURES]
    if not known:
        raise ConfigError(
            f"{where}: unsupported architecture {archs or hf.get('model_type')!r}; "
            f"supported: {sorted(ARCHITECTURES)}"
        )
    arch = ARCHITECTURES[known[0]]
    try:
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
        if hf.get("mlp_bias", False):
            raise ConfigError(f"{where}: mlp_bias=true is not supported")
        if hf.get("use_sliding_window", False):
            raise ConfigError(f"{where}: use_sliding_window=true is not supported")
        num_heads = int(hf["num_attention_heads"])
        num_kv_heads = int(hf.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise ConfigError(f"{where}: num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
        attention_bias = bool(hf.get("attention_bias", False))
        pad = hf.get("pad_token_id")
        eos = _token_ids(hf.get("eos_token_id"))
        return ModelConfig(
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(hf, where),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=arch != "qwen2" and attention_bias,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            eos_token_ids=eos,
            pad_token_id=int(pad if isinstance(pad, int) else (eos[0] if eos else 0)),
            **_experts_from_hf(hf, arch, where),
        )
    except KeyError as e:
        raise ConfigError(f"{where}: missing required field {e.args[0]!r}") from None


def read_hf_config(folder: Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in checkpoint folder {folder}")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    generation = Path(folder) / "generation_config.json"
    if generation.is_file():  # chat checkpoints list their end-of-turn tokens here
        try:
            extra_eos = _token_ids(json.loads(generation.read_text()).get("eos_token_id"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{generation}: not valid JSON ({e})") from None
        hf = {**hf, "eos_token_id": list(dict.fromkeys(_token_ids(hf.get("eos_token_id")) + extra_eos))}
    return config_from_hf(hf, str(path))
