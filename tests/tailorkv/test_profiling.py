"""TailorKV layer identification: constructed dense/sparse layers, brute-force parity (unmasked, as
the reference scores), JSON, lookup, the calibration prompt."""

import json

import jax
import numpy as np
import pytest
import torch

import dami_jax as dj
from dami_jax.evals.benchmarks import gsm8k_offline_rows
from dami_jax.evals.calibration import FINAL_QUESTION, calibration_text, calibration_tokens
from dami_jax.evals.plots import plot_profile
from dami_jax.models.config import ModelConfig
from dami_jax.models.tokenizer import load_tokenizer
from dami_jax.tailorkv.profiling import (
    BUILTIN_SPLITS,
    LayerProfile,
    dense_preference_scores,
    format_profile,
    normalize_model_name,
    profile_layers,
    quantized_layers_for,
)

BOS = 1


def _constructed_model() -> tuple[ModelConfig, dict]:
    """3 layers whose residual stream stays the embedding (zero o and down projections).

    Layers 0 and 2 attend almost only to the BOS token at position 0 (sparse): a constant query
    (q_bias) meets a large key that only BOS has, in the slowest RoPE pair so that distance
    barely rotates it. Layer 1 has zero queries: uniform attention (dense).
    """
    cfg = ModelConfig(architecture="llama", vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=16, attention_bias=True, max_position_embeddings=512)  # fmt: skip
    params = jax.tree.map(np.array, dj.init_params(cfg, jax.random.key(0)))
    params["embed"][:, 0] = 0.0
    params["embed"][BOS, 0] = 10.0  # only BOS carries feature 0 (normed: ~sqrt(32))
    slow = cfg.head_dim // 2 - 1  # lowest-frequency RoPE pair (slow, slow + head_dim/2)
    for i, layer in enumerate(params["layers"]):
        layer["attn"]["o"][:] = 0.0
        layer["mlp"]["down"][:] = 0.0
        layer["attn"]["q"][:] = 0.0
        if i != 1:
            layer["attn"]["q_bias"].reshape(cfg.num_heads, cfg.head_dim)[:, slow] = 4.6
            layer["attn"]["k"][:] = 0.0
            layer["attn"]["k"].reshape(cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim)[0, :, slow] = 4.6
    return cfg, params


def _tokens(length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.concatenate([[BOS], np.random.default_rng(seed).integers(3, vocab, length - 1)]).astype(np.int32)


def test_constructed_dense_and_sparse_layers_are_classified():
    cfg, params = _constructed_model()
    t, top_k = 200, 10  # int(0.05 * 200)
    profile = profile_layers(params, cfg, _tokens(t, cfg.vocab_size), model="constructed")
    assert profile.dense_layers == (1,) and profile.sparse_layers == (0, 2)
    # Uniform attention over all t keys (no causal mask): each query keeps top_k / t of its mass.
    np.testing.assert_allclose(profile.scores[1], 1 - top_k / t, atol=1e-5)
    assert profile.scores[0] < 0.01 and profile.scores[2] < 0.01
    assert profile.num_tokens == t and profile.model == "constructed"


def _rope_np(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    hd = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    angles = positions[:, None, None] * inv_freq  # [T, 1, hd/2]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return np.concatenate([x1 * np.cos(angles) - x2 * np.sin(angles), x2 * np.cos(angles) + x1 * np.sin(angles)], -1)


def _score_from_probs(probs: np.ndarray, alpha: float, last_q: int) -> float:
    """The definition on full attention matrices probs [H, T, T]."""
    t = probs.shape[-1]
    rows = np.sort(probs[:, -last_q:], axis=-1)[..., ::-1]
    return float(np.mean(1 - rows[..., : max(1, int(alpha * t))].sum(-1)))


def test_layer_score_matches_numpy_brute_force_without_a_causal_mask():
    cfg = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5)  # fmt: skip
    params = dj.init_params(cfg, jax.random.key(1), scale=0.5)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, 90)
    t, hd = len(tokens), cfg.head_dim
    layer = jax.tree.map(lambda x: np.asarray(x, np.float64), params["layers"][0])
    h = np.asarray(params["embed"], np.float64)[tokens]
    x = h / np.sqrt(np.mean(h * h, -1, keepdims=True) + cfg.rms_norm_eps) * layer["attn_norm"]
    q = _rope_np((x @ layer["attn"]["q"]).reshape(t, cfg.num_heads, hd), np.arange(t), cfg.rope.theta)
    k = _rope_np((x @ layer["attn"]["k"]).reshape(t, cfg.num_kv_heads, hd), np.arange(t), cfg.rope.theta)
    kv = np.arange(cfg.num_heads) // (cfg.num_heads // cfg.num_kv_heads)
    logits = np.einsum("thd,shd->hts", q, k[:, kv]) / np.sqrt(hd)

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    unmasked, causal = softmax(logits), softmax(np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf))
    for alpha, last_q in ((0.05, 32), (0.2, 7), (0.01, 200)):  # last_q > T: every row
        expected = _score_from_probs(unmasked, alpha, min(last_q, t))
        actual = dense_preference_scores(params, cfg, tokens, alpha=alpha, last_q=last_q)
        np.testing.assert_allclose(actual, [expected], atol=1e-5)
    # The mask matters at the defaults: the causal score is 0.036, the reference's (unmasked) 0.050.
    assert abs(dense_preference_scores(params, cfg, tokens)[0] - _score_from_probs(causal, 0.05, 32)) > 0.01


def test_every_layer_matches_transformers_attention_weights(make_tiny):
    """The last query row, where causal and unmasked attention agree, checks q and k per layer."""
    tiny = make_tiny("qwen3")  # qk-norm, GQA, head_dim != hidden / heads
    tiny.model.set_attn_implementation("eager")
    tokens = np.random.default_rng(2).integers(3, 256, (1, 120))
    with torch.no_grad():
        out = tiny.model(torch.as_tensor(tokens), output_attentions=True)
    expected = [_score_from_probs(a[0].double().numpy(), 0.05, 1) for a in out.attentions]
    cfg, params = dj.load_checkpoint(tiny.path)
    np.testing.assert_allclose(dense_preference_scores(params, cfg, tokens, last_q=1), expected, atol=1e-5)


def _profile() -> LayerProfile:
    return LayerProfile((0.9, 0.1, 0.05), 0.2, (0,), (1, 2), num_tokens=2048, model="m", calibration="gsm8k")


def test_json_round_trip_table_and_plot(tmp_path):
    profile = _profile()
    path = profile.save(tmp_path / "p" / "layer_profile.json")
    assert LayerProfile.load(path) == profile == LayerProfile.from_json(json.loads(json.dumps(profile.to_json())))
    assert json.loads(path.read_text())["num_layers"] == 3
    assert "dense layers [0]" in format_profile(profile)
    assert plot_profile(profile, tmp_path / "plot.png").stat().st_size > 1000
    # A hand-edited split is honoured; an inconsistent one is rejected.
    edited = {**profile.to_json(), "dense_layers": [0, 1], "sparse_layers": [2]}
    assert LayerProfile.from_json(edited).dense_layers == (0, 1)
    with pytest.raises(ValueError, match="must split"):
        LayerProfile.from_json({**profile.to_json(), "dense_layers": [0, 1]})
    with pytest.raises(ValueError, match="lacks field"):
        LayerProfile.from_json({"scores": [0.5]})


def test_builtin_splits_are_the_published_ones():
    """The reference's config/model2quantlayer.json (AWQ checkpoints left out), plus meta-llama's
    current name of the same Llama-3.1-8B-Instruct weights; nothing measured by us."""
    assert BUILTIN_SPLITS == {
        "metallama318binstruct": (0,), "llama318binstruct": (0,), "llama27b32kinstruct": (0, 1),
        "yi6b200k": (0, 1), "yi9b200k": (0, 1), "mistral7binstructv03": (0,),
    }  # fmt: skip


def test_quantized_layers_lookup_order_and_error(tmp_path):
    assert normalize_model_name("meta-llama/Llama-3.1-8B-Instruct") == "llama318binstruct"
    assert quantized_layers_for("meta-llama/Llama-3.1-8B-Instruct", 32) == (0,)
    assert quantized_layers_for("NousResearch/Meta-Llama-3.1-8B-Instruct", 32) == (0,)
    assert quantized_layers_for("01-ai/Yi-9B-200K", 48) == (0, 1)
    assert quantized_layers_for("mistralai/Mistral-7B-Instruct-v0.3", 32) == (0,)
    folder = tmp_path / "ckpt"  # a folder name that says nothing; config.json names the model
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "togethercomputer/Llama-2-7B-32K-Instruct"}))
    assert quantized_layers_for(folder, 32) == (0, 1)
    # A saved profile wins over the table: explicit path, then one inside the model folder.
    saved = _profile().save(tmp_path / "elsewhere.json")
    assert quantized_layers_for("meta-llama/Llama-3.1-8B-Instruct", 3, profile_path=saved) == (0,)
    LayerProfile((0.1, 0.5, 0.6), 0.2, (1, 2), (0,)).save(folder / "layer_profile.json")
    assert quantized_layers_for(folder, 3) == (1, 2)
    with pytest.raises(ValueError, match="3 layers, the model has 32"):
        quantized_layers_for(folder, 32)
    unpublished = (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "mistralai/Mistral-7B-v0.3",
        "togethercomputer/LLaMA-2-7B-32K",
    )
    for name in unpublished:
        with pytest.raises(LookupError, match="dami-jax profile-layers"):
            quantized_layers_for(name, 32)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"alpha": 0.0}, "alpha"), ({"alpha": 1.5}, "alpha"), ({"tau": -0.1}, "tau"), ({"tau": 1.2}, "tau"),
     ({"tau": float("nan")}, "tau"), ({"last_q": 0}, "last_q")],
)  # fmt: skip
def test_invalid_arguments_name_themselves(kwargs, name):
    cfg, params = _constructed_model()
    with pytest.raises(ValueError, match=name):
        profile_layers(params, cfg, _tokens(40, cfg.vocab_size), **kwargs)
    if name != "last_q":
        with pytest.raises(ValueError, match=name):
            LayerProfile((0.5,), **{"tau": 0.2, "dense_layers": (0,), "sparse_layers": (), **kwargs})


def test_calibration_text_is_the_references_prompt_on_gsm8k_test():
    """50 pairs, each with the full worked solution, newline-joined, then the reference's question."""
    rows = gsm8k_offline_rows()
    text = calibration_text()
    pairs = text.split("\nQuestion: ")
    assert text.startswith("Question: ") and len(pairs) == 51 and pairs[-1] == FINAL_QUESTION
    for row, pair in zip(rows, pairs[:-1]):
        question, answer = pair.removeprefix("Question: ").split("\nAnswer: ")
        assert question == row["question"].strip() and answer == row["answer"].strip()
        steps, final = answer.rsplit("\n", 1)  # the worked steps, then "#### N"
        assert steps and final.startswith("#### ")
    assert rows[50]["question"].strip() not in text and "\n\nQuestion" not in text


def test_calibration_tokens_are_not_cut_unless_too_many(smollm2_path):
    tokenizer = load_tokenizer(smollm2_path)
    full = tokenizer(calibration_text())["input_ids"]
    ids, described = calibration_tokens(tokenizer, 100_000)
    assert ids.tolist() == full and "cut" not in described and f"{len(full)} tokens" in described
    ids, described = calibration_tokens(tokenizer, 8192)  # SmolLM2's positions: the beginning goes
    assert len(full) > 8192 and ids.tolist() == full[-8192:] and described.endswith("cut to the last 8192")
