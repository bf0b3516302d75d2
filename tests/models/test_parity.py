"""Numerical parity with transformers (torch CPU, float32): logits and greedy generation."""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import VARIANTS, random_tokens, rel_err, to_v4_config

import dami_jax as dj
from dami_jax.models.tokenizer import chat_tokens, load_tokenizer

pytestmark = pytest.mark.usefixtures("highest_precision")

STYLES = ["v5", "v4"]
NEW_TOKENS = 24


def torch_greedy(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int) -> list[list[int]]:
    """transformers greedy generation, batched with left padding; EOS disabled."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    # transformers merges unset (None) fields of a passed GenerationConfig with the model's
    # defaults, so EOS is switched off on a copy of the model's own generation config.
    config = copy.deepcopy(model.generation_config)
    config.update(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=None, eos_token_id=None, pad_token_id=pad_id)
    saved, model.generation_config = model.generation_config, config
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask)
    finally:
        model.generation_config = saved
    new = out[:, width:].numpy()
    assert new.shape == (len(prompts), max_new_tokens), "transformers stopped early"
    return new.tolist()


# --------------------------------------------------------------------------- config styles


@pytest.mark.parametrize("name", ["llama", "llama3_rope", "llama_linear_rope", "qwen2", "qwen3", "qwen3_moe"])
def test_v4_config_loads_in_transformers_and_dami_alike(make_tiny, name):
    """The v4 rewrite is faithful: transformers reads it back to the same logits, and dami-jax
    parses the same ModelConfig from both styles."""
    tiny = make_tiny(name, "v5")
    cfg5 = dj.load_checkpoint(tiny.path)[0]
    hf = json.loads((tiny.path / "config.json").read_text())
    assert "rope_parameters" in hf
    v4 = to_v4_config(tiny.path)
    assert "rope_parameters" not in v4 and "rope_theta" in v4 and "rope_scaling" in v4
    cfg4 = dj.load_checkpoint(tiny.path)[0]
    assert cfg4 == cfg5
    assert cfg4.rope.type == VARIANTS[name].config["rope_parameters"]["rope_type"]

    reloaded = getattr(transformers, VARIANTS[name].cls).from_pretrained(tiny.path).eval()
    assert reloaded.config.rope_parameters["rope_type"] == cfg5.rope.type
    tokens = random_tokens(1, 80, seed=3)
    with torch.no_grad():
        got = reloaded(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_array_equal(got, tiny.torch_logits(tokens))


# --------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_transformers(make_tiny, name, style):
    tiny = make_tiny(name, style)
    cfg, params = dj.load_checkpoint(tiny.path)
    expected_cls = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe"}
    assert cfg.architecture == expected_cls[tiny.variant.cls]
    assert cfg.tie_word_embeddings == tiny.variant.config["tie_word_embeddings"]
    assert ("lm_head" in params) == (not cfg.tie_word_embeddings)
    tokens = random_tokens(2, 130, seed=1)
    logits = dj.forward(params, cfg, jnp.asarray(tokens))
    assert logits.dtype == jnp.float32 and logits.shape == (2, 130, cfg.vocab_size)
    ref = tiny.torch_logits(tokens)
    assert rel_err(logits, ref) < 1e-4
    # The models are not degenerate: top-1 differs across positions and logits are spread.
    assert len(np.unique(ref.argmax(-1))) > 10 and ref.std() > 0.3


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_greedy_generation_matches_transformers(make_tiny, name, style):
    tiny = make_tiny(name, style)
    cfg, params = dj.load_checkpoint(tiny.path)
    rng = np.random.default_rng(7)
    # Different lengths, and the longer one crosses the 32-token prompt bucket.
    prompts = [rng.integers(3, cfg.vocab_size, size=n).tolist() for n in (37, 9)]
    out = dj.generate(params, cfg, prompts, max_new_tokens=NEW_TOKENS, stop_tokens=[])
    assert out.tokens.shape == (2, NEW_TOKENS)
    np.testing.assert_array_equal(np.asarray(out.lengths), [NEW_TOKENS, NEW_TOKENS])
    ref = torch_greedy(tiny.model, prompts, NEW_TOKENS, pad_id=cfg.pad_token_id)
    assert out.token_lists() == ref


# --------------------------------------------------------------------------- bfloat16


def test_bfloat16_close_to_float32(make_tiny):
    tiny = make_tiny("qwen3")
    cfg, p32 = dj.load_checkpoint(tiny.path)
    cfg16, p16 = dj.load_checkpoint(tiny.path, dtype=jnp.bfloat16)
    assert cfg16 == cfg
    assert {leaf.dtype for leaf in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
    tokens = jnp.asarray(random_tokens(2, 64, seed=5))
    l32 = np.asarray(dj.forward(p32, cfg, tokens))
    l16 = dj.forward(p16, cfg, tokens)
    assert l16.dtype == jnp.float32  # logits stay float32 whatever the params
    l16 = np.asarray(l16)
    assert rel_err(l16, l32) < 0.05
    assert np.mean(l16.argmax(-1) == l32.argmax(-1)) > 0.9
    # Greedy decoding runs in bf16 as well, with a bf16 cache.
    out = dj.generate(p16, cfg, [[5, 6, 7, 8]], max_new_tokens=4, stop_tokens=[])
    assert np.asarray(out.lengths).tolist() == [4]


# --------------------------------------------------------------------------- SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    cfg, params = dj.load_checkpoint(smollm2_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    return cfg, params, model, load_tokenizer(smollm2_path)


def test_smollm2_config(smollm2):
    cfg, params, _, tok = smollm2
    assert cfg.architecture == "llama" and cfg.num_layers == 30 and cfg.tie_word_embeddings
    assert cfg.num_heads == 9 and cfg.num_kv_heads == 3 and cfg.head_dim == 64
    assert tok.convert_tokens_to_ids("<|im_end|>") in cfg.eos_token_ids


def test_smollm2_logits_match_transformers(smollm2):
    cfg, params, model, tok = smollm2
    prompt = chat_tokens(tok, "Explain in one sentence why the sky is blue.")
    assert prompt[0] == tok.convert_tokens_to_ids("<|im_start|>") and len(prompt) > 20
    tokens = np.asarray([prompt], np.int32)
    logits = np.asarray(dj.forward(params, cfg, jnp.asarray(tokens)))
    with torch.no_grad():
        ref = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    assert rel_err(logits, ref) < 1e-4
    np.testing.assert_array_equal(logits.argmax(-1), ref.argmax(-1))


@pytest.mark.slow  # heaviest test: 6-15 s idle, ~100 s seen on a contended 2-core machine
def test_smollm2_greedy_answer(smollm2):
    cfg, params, model, tok = smollm2
    prompts = [
        chat_tokens(tok, "What is the capital of France?"),
        chat_tokens(tok, "Name three primary colors, please. Answer briefly."),
    ]
    assert len(prompts[0]) != len(prompts[1])
    n = 32
    out = dj.generate(params, cfg, prompts, max_new_tokens=n, stop_tokens=[])
    ours = out.token_lists()
    assert "Paris" in tok.decode(ours[0])
    assert ours == torch_greedy(model, prompts, n, pad_id=cfg.pad_token_id)
    # With the checkpoint's EOS (same shapes: no recompile) rows stop at <|im_end|>, counted in the length.
    stopped = dj.generate(params, cfg, prompts, max_new_tokens=n)
    for row, full in zip(stopped.token_lists(), ours):
        eos = [i for i, t in enumerate(full) if t in cfg.eos_token_ids]
        assert row == (full[: eos[0] + 1] if eos else full)


def test_smollm2_bfloat16(smollm2_path, smollm2):
    cfg, p32, _, tok = smollm2
    cfg16, p16 = dj.load_checkpoint(smollm2_path, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
    tokens = jnp.asarray([chat_tokens(tok, "What is the capital of France?")])
    l32 = np.asarray(dj.forward(p32, cfg, tokens))
    l16 = np.asarray(dj.forward(p16, cfg16, tokens))
    assert rel_err(l16, l32) < 0.1
    assert np.mean(l16.argmax(-1) == l32.argmax(-1)) > 0.8
