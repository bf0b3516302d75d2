"""The torch-free GGUF conversion against transformers' own GGUF loading (torch): the same file
gives the same tensors bit for bit, the same model config and the same tokenizer."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from dami_jax.errors import InputError
from dami_jax.models.config import config_from_hf, read_hf_config
from dami_jax.models.gguf import convert_gguf, unpermute_heads
from dami_jax.models.tokenizer import chat_tokens, load_tokenizer

TEXTS = [
    "Hello world! 12345 6789 3.14159",
    "  leading spaces,\ttabs\nand\r\nnewlines   ",
    "ünïcödé, 日本語, emoji 🎉👍🏽, Ελληνικά",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "a=37, b=a+9, c=b*2. c=? \\boxed{92}",
    "def f(x):\n    return x ** 2  # comment",
]


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@pytest.mark.parametrize("heads, head_dim, columns", [(1, 2, 3), (9, 64, 5), (3, 8, 1)])
def test_unpermute_heads_inverts_llama_cpp(heads, head_dim, columns):
    weight = np.random.default_rng(heads).standard_normal((heads * head_dim, columns)).astype(np.float32)
    permuted = llama_cpp_permute(weight, heads)
    assert heads == 1 and head_dim == 2 or not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(unpermute_heads(permuted, heads), weight)


@pytest.mark.slow  # transformers dequantizes the 135M-parameter file through torch (~1 min on 2 cores)
def test_smollm2_converts_as_transformers_does(smollm2_gguf_file, tmp_path):
    ours = convert_gguf(smollm2_gguf_file, tmp_path / "ours")
    folder, name = str(smollm2_gguf_file.parent), smollm2_gguf_file.name
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    reference = {key: value.numpy() for key, value in model.state_dict().items()}
    tensors = load_file(str(ours / "model.safetensors"))
    assert model.config.tie_word_embeddings and set(reference) == set(tensors) | {"lm_head.weight"}
    for key, tensor in tensors.items():
        assert tensor.dtype == np.float32 and np.array_equal(tensor, reference[key]), key
    their_config = {**model.config.to_dict(), "architectures": [type(model).__name__]}
    del model, reference

    assert read_hf_config(ours) == config_from_hf(their_config, "transformers' GGUF config")
    config = transformers.AutoConfig.from_pretrained(ours)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(config, key) == their_config[key], key

    tokenizer, reference_tokenizer = load_tokenizer(ours), transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    assert tokenizer.get_vocab() == reference_tokenizer.get_vocab()
    assert tokenizer.special_tokens_map == reference_tokenizer.special_tokens_map
    assert tokenizer.chat_template == reference_tokenizer.chat_template
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == reference_tokenizer.encode(text), text
        assert tokenizer.decode(ids) == reference_tokenizer.decode(ids) == text
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXTS[2]}]
    assert chat_tokens(tokenizer, conversation) == chat_tokens(reference_tokenizer, conversation)


def test_what_is_not_converted_is_refused_by_name(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "qwen.gguf", "qwen2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InputError, match=r"qwen\.gguf: architecture 'qwen2'"):
        convert_gguf(tmp_path / "qwen.gguf", tmp_path / "out")
    (tmp_path / "text.gguf").write_text("not a GGUF file")
    with pytest.raises(InputError, match=r"text\.gguf: not a readable GGUF file"):
        convert_gguf(tmp_path / "text.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
