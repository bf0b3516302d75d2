"""GGUF -> HF safetensors folder, without torch: the ``gguf`` package (numpy only) reads the file
and dequantizes its tensors.

Supported: the llama architecture with a byte-level BPE ("gpt2") vocabulary, as the pinned
SmolLM2-135M-Instruct is stored; anything else is refused by name. The folder written equals
transformers' own GGUF conversion tensor for tensor (tests/models/test_gguf.py checks it), which
takes three steps that a plain read would miss:

- quantized tensors (Q4_1, Q8_0, ...) are dequantized to float32 by ``gguf.quants.dequantize``;
- llama.cpp stores ``attn_q`` / ``attn_k`` with each head's rows reordered for its rotary
  embedding (the two halves of a head interleaved); :func:`unpermute_heads` puts them back;
- the vocabulary is rebuilt as transformers does: tokens marked control become special tokens,
  user-defined ones plain added tokens, and text is split with GPT-2's pattern. SmolLM2's file
  names its split ``smollm``, which llama.cpp applies with every digit split off first;
  transformers reads it as GPT-2's, and so do we: the pinned Thinking update was trained on
  that tokenization.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from dami_jax.errors import InputError
from dami_jax.models.checkpoint import hf_tensor_names
from dami_jax.models.config import ModelConfig, RopeConfig, config_to_hf
from dami_jax.models.tokenizer import PreTrainedTokenizerFast, byte_alphabet

# llama.cpp's tensor names -> transformers' (per block: "blk.N.<name>" -> "model.layers.N.<name>")
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}  # fmt: skip
# Text splits that transformers reads as GPT-2's pattern (llama.cpp's names for them).
GPT2_SPLITS = ("default", "gpt-2", "smollm")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types
SPECIAL = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}  # -> tokenizer.ggml.*


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Write ``config.json``, ``generation_config.json``, ``model.safetensors`` and the tokenizer
    files to ``out_dir`` (whole or not at all). Raises :class:`InputError` naming the file for
    anything this converter does not read faithfully."""
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} does not exist")
    try:
        reader = gguf.GGUFReader(gguf_file)
    except (ValueError, OSError) as error:
        raise InputError(f"{gguf_file}: not a readable GGUF file ({error})") from None
    meta = _Metadata(reader, gguf_file)
    cfg = _config(meta, tied="output.weight" not in {tensor.name for tensor in reader.tensors})
    tensors = _tensors(reader, cfg, gguf_file)
    tokenizer = _tokenizer(meta)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        ids = {f"{name}_token_id": meta.get(f"tokenizer.ggml.{key}") for name, key in SPECIAL.items()}
        ids = {key: int(value) for key, value in ids.items() if value is not None}
        config = {**config_to_hf(cfg), **ids, "torch_dtype": "float32"}
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        generation = {key: value for key, value in ids.items() if key != "unk_token_id"}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
        tokenizer.save_pretrained(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


class _Metadata:
    """The file's key-value metadata, each value decoded once; a missing required key names the file."""

    def __init__(self, reader: gguf.GGUFReader, path: Path):
        self.fields, self.path = reader.fields, path
        self._values: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self.fields:
            return default
        if key not in self._values:
            self._values[key] = self.fields[key].contents()
        return self._values[key]

    def __getitem__(self, key: str) -> Any:
        if key not in self.fields:
            raise InputError(f"{self.path}: the GGUF metadata has no {key}")
        return self.get(key)


def _config(meta: _Metadata, tied: bool) -> ModelConfig:
    arch = meta["general.architecture"]
    if arch != "llama":
        raise InputError(f"{meta.path}: architecture {arch!r}; converting without torch reads llama GGUF files only")
    if any(key.startswith("llama.rope.scaling") for key in meta.fields):
        raise InputError(f"{meta.path}: rope scaling (llama.rope.scaling.*) is not converted; only plain RoPE")
    heads, hidden = int(meta["llama.attention.head_count"]), int(meta["llama.embedding_length"])
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture="llama",
        vocab_size=len(meta["tokenizer.ggml.tokens"]),
        hidden_size=hidden,
        intermediate_size=int(meta["llama.feed_forward_length"]),
        num_layers=int(meta["llama.block_count"]),
        num_heads=heads,
        num_kv_heads=int(meta.get("llama.attention.head_count_kv", heads)),
        head_dim=int(meta.get("llama.rope.dimension_count", hidden // heads)),
        rms_norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
        rope=RopeConfig(theta=float(meta.get("llama.rope.freq_base", 10000.0))),
        tie_word_embeddings=tied,
        max_position_embeddings=int(meta["llama.context_length"]),
        eos_token_ids=() if eos is None else (int(eos),),
        pad_token_id=int(meta.get("tokenizer.ggml.padding_token_id", eos if eos is not None else 0)),
    )


def unpermute_heads(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary reordering of a q/k projection [heads * head_dim, ...]: it stores
    each head's rows as (head_dim / 2, 2) pairs where transformers has (2, head_dim / 2) halves."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensors(reader: gguf.GGUFReader, cfg: ModelConfig, path: Path) -> dict[str, np.ndarray]:
    heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}
    tensors = {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in BLOCK_TENSORS:
            name = f"model.layers.{parts[1]}.{BLOCK_TENSORS[parts[2]]}.{parts[3]}"
        elif len(parts) == 2 and parts[0] in GLOBAL_TENSORS:
            name = f"{GLOBAL_TENSORS[parts[0]]}.{parts[1]}"
        else:
            raise InputError(f"{path}: tensor {tensor.name} has no place in a llama checkpoint")
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        if parts[0] == "blk" and parts[2] in heads:
            weight = unpermute_heads(weight, heads[parts[2]])
        tensors[name] = np.ascontiguousarray(weight)
    expected = set(hf_tensor_names(cfg))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise InputError(f"{path}: tensors do not make a {cfg.num_layers}-layer llama (missing {missing[:3]}, unexpected {extra[:3]})")
    return tensors


def _tokenizer(meta: _Metadata) -> PreTrainedTokenizerFast:
    """The byte-level BPE vocabulary the file describes, with its special tokens and chat template."""
    kind, split = meta["tokenizer.ggml.model"], meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or split not in GPT2_SPLITS:
        raise InputError(f"{meta.path}: tokenizer {kind!r} with text split {split!r}; converting without torch reads "
                         f"byte-level BPE (gpt2) vocabularies split as {', '.join(GPT2_SPLITS)}")  # fmt: skip
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    # A token stored as plain text (not in the byte alphabet) is spelled byte by byte.
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode())): i for i, t in enumerate(tokens)}
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    backend = Tokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # Control tokens outside the byte alphabet are llama.cpp mislabels (transformers skips them too).
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, kind in zip(tokens, types)
                                if kind == CONTROL and set(t) <= alphabet])  # fmt: skip
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, types)
                        if kind == USER_DEFINED and t in vocab])  # fmt: skip
    named = {f"{name}_token": tokens[int(i)] for name, key in SPECIAL.items() if (i := meta.get(f"tokenizer.ggml.{key}")) is not None}
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=meta.get("tokenizer.chat_template"), **named)
