"""TailorKV cache: config errors, exactness limits, quantized bookkeeping, host offload, presets,
token scoring."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dami_jax as dj
from dami_jax.decoding.cache import DenseCacheConfig, DenseKVCache, cache_bytes
from dami_jax.decoding.generation import build_cache, decode_step, prepare_prompts
from dami_jax.evals.plots import plot_cache_costs
from dami_jax.models.config import ModelConfig
from dami_jax.tailorkv.cache import (
    TAILORKV_1,
    TAILORKV_2,
    QuantizedLayerCache,
    SparseLayerCache,
    TailorKVConfig,
    select_channels,
    token_scores,
)

CFG = ModelConfig(architecture="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=4096)  # fmt: skip
PARAMS = dj.init_params(CFG, jax.random.key(0), scale=0.15)


def prompts(*lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in lengths]


def run(cache, rows, new=24):
    return dj.generate(PARAMS, CFG, rows, max_new_tokens=new, stop_tokens=[], cache=cache)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(budget=60, sink=8, recent=56), "budget=60 is smaller than sink"),
        (dict(bits=3), "bits"),
        (dict(residual=96, group=64), "residual"),
        (dict(num_channels=0), "num_channels"),
        (dict(token_score="mean"), r"token_score must be one of \('group_mean', 'head_max'\)"),
    ],
)
def test_bad_config_is_rejected_up_front(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TailorKVConfig(**kwargs)


@pytest.mark.parametrize(
    "config, match",
    [
        (TailorKVConfig(group=48, residual=96), "group=48 must divide head_dim=64"),
        (TailorKVConfig(quantized_layers=(5,)), "quantized_layers"),
        (TailorKVConfig(num_channels=65), "num_channels"),
    ],
)
def test_config_that_does_not_fit_the_model(config, match):
    with pytest.raises(ValueError, match=match):
        run(config, prompts(100))


def test_budget_covering_the_prompt_reproduces_dense_attention():
    rows = prompts(300, 230)
    full = TailorKVConfig(bits=2, budget=400, sink=8, recent=56, quantized_layers=())  # every layer sparse
    dense, sparse = run(dj.DenseCacheConfig(), rows), run(full, rows)
    np.testing.assert_array_equal(sparse.tokens, dense.tokens)
    np.testing.assert_allclose(sparse.logprobs, dense.logprobs, atol=2e-4)


def test_quantized_layers_are_exact_while_the_residual_holds_everything():
    rows = prompts(200, 150)
    roomy = TailorKVConfig(bits=1, residual=512, quantized_layers=(0, 1, 2))  # nothing gets quantized
    dense, quant = run(dj.DenseCacheConfig(), rows), run(roomy, rows)
    np.testing.assert_array_equal(quant.tokens, dense.tokens)
    np.testing.assert_allclose(quant.logprobs, dense.logprobs, atol=2e-4)


def test_quantized_store_and_residual_track_the_dense_cache():
    """Layer 0's keys depend only on the tokens, so its quantized store can be checked against the
    dense cache token by token through several residual flushes."""
    config = TailorKVConfig(bits=4, quantized_layers=(0,), scale_dtype="float32")
    tokens, start, size = prepare_prompts(prompts(260, 200), CFG, max_new_tokens=160)
    _, dense = build_cache(PARAMS, tokens, start, cfg=CFG, cache_size=size)
    _, tkv = build_cache(PARAMS, tokens, start, cfg=CFG, cache_size=size, cache_config=config)
    step = jax.jit(decode_step, static_argnums=1)
    feed = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (160, 2)), jnp.int32)
    for token in feed:
        _, dense = step(PARAMS, CFG, token, dense)
        _, tkv = step(PARAMS, CFG, token, tkv)
    n_quant, n_res, length = int(tkv.n_quant), int(tkv.n_res), int(tkv.length)
    assert n_quant + n_res == length == int(dense.length)
    assert n_quant % config.group == 0 and config.residual - config.group <= n_res < config.residual
    layer: QuantizedLayerCache = tkv.layers[0]
    k_dense = np.asarray(dense.k[0])
    np.testing.assert_array_equal(np.asarray(layer.k_res[:, :, :n_res]), k_dense[:, :, n_quant:length])
    step_scale = np.repeat(np.asarray(layer.keys.scale), config.group, axis=2)[:, :, :n_quant]
    error = np.abs(np.asarray(layer.keys.dequantize())[:, :, :n_quant] - k_dense[:, :, :n_quant])
    assert np.all(error <= step_scale / 2 + 1e-5)


def test_sparse_prompt_kv_lives_in_host_memory_and_device_bytes_shrink():
    tokens, start, size = prepare_prompts(prompts(900), CFG, max_new_tokens=32)
    _, dense = build_cache(PARAMS, tokens, start, cfg=CFG, cache_size=size)
    _, tkv = build_cache(PARAMS, tokens, start, cfg=CFG, cache_size=size, cache_config=TAILORKV_1)
    sparse: SparseLayerCache = tkv.layers[1]
    assert sparse.k_host.sharding.memory_kind == "pinned_host"
    assert sparse.kt_host.shape == (1, CFG.num_kv_heads, CFG.head_dim, 928)  # 900 tokens left-padded to a multiple of 32
    assert sparse.k_window.sharding.memory_kind == "device"
    (dense_device, dense_host), (tkv_device, tkv_host) = cache_bytes(dense), cache_bytes(tkv)
    assert tkv_device * 3 < dense_device
    sparse_layers = [layer for layer in tkv.layers if isinstance(layer, SparseLayerCache)]
    assert dense_host == 0 and tkv_host == sum(3 * layer.k_host.nbytes for layer in sparse_layers)  # k, v, k transposed


def test_cache_costs_plot(tmp_path):
    tokens, start, size = prepare_prompts(prompts(300), CFG, max_new_tokens=8)
    costs = []
    for name, config in (("dense", DenseCacheConfig()), ("TailorKV-1", TAILORKV_1)):
        _, cache = build_cache(PARAMS, tokens, start, cfg=CFG, cache_size=size, cache_config=config)
        on_device, on_host = cache_bytes(cache)
        costs.append({"config": name, "device_bytes": on_device, "host_bytes": on_host, "seconds": 0.01 * (len(costs) + 1)})
    assert plot_cache_costs(costs, tmp_path / "costs.png").stat().st_size > 1000


@pytest.mark.parametrize("preset", [TAILORKV_1, TAILORKV_2], ids=["TailorKV-1", "TailorKV-2"])
def test_presets_generate_end_to_end_for_a_batch(preset):
    rows = prompts(1100, 700)  # longer than TailorKV-2's 1024-token budget
    out = run(preset, rows, new=40)
    assert out.tokens.shape == (2, 40) and np.all(np.asarray(out.lengths) == 40)
    assert np.all((np.asarray(out.tokens) >= 0) & (np.asarray(out.tokens) < CFG.vocab_size))
    assert np.all(np.isfinite(np.asarray(out.logprobs)))


def test_channel_importance_uses_group_mean_query_times_key_range():
    query = jnp.zeros((1, 1, 4, 8)).at[0, 0, :2, 3].set(1.0).at[0, 0, 2:, 5].set(2.0)  # heads 0-1 -> kv 0
    k_absmax = jnp.ones((1, 2, 8)).at[0, 0, 6].set(100.0)
    chosen = np.asarray(select_channels(query, k_absmax, 1))
    assert chosen[0, 0, 0] == 3 and chosen[0, 1, 0] == 5
    query = query.at[0, 0, 0, 6].set(0.1)  # tiny query, huge key range: wins for kv head 0
    assert np.asarray(select_channels(query, k_absmax, 1))[0, 0, 0] == 6


def test_streaming_with_a_tailorkv_cache_matches_generate():
    rows = prompts(300, 200)
    config = TailorKVConfig(bits=2, budget=128, sink=8, recent=56, quantized_layers=(0,))
    streamed = np.stack(list(dj.stream_tokens(PARAMS, CFG, rows, max_new_tokens=12, stop_tokens=[], cache=config)))
    np.testing.assert_array_equal(streamed.T, np.asarray(run(config, rows, new=12).tokens))


def test_token_scores_group_mean_and_head_max_pick_what_they_define():
    """Head 0 aligns strongly with token A; the group mean aligns with token B."""
    q_channels = jnp.array([[10.0, 0.0], [-9.0, 3.0]])[None, None]  # [B=1, Hkv=1, G=2, C=2]; mean (0.5, 1.5)
    rows = jnp.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])[None, None]  # [1, 1, C, P]: token 0 none, A = 1, B = 2
    mean, head_max = (np.asarray(token_scores(q_channels, rows, mode))[0, 0] for mode in ("group_mean", "head_max"))
    np.testing.assert_allclose(mean, [0.0, 0.5, 1.5])  # mean query . key
    np.testing.assert_allclose(head_max, [0.0, 10.0, 3.0])  # max over heads of q_h . key
    assert int(np.argmax(mean)) == 2 and int(np.argmax(head_max)) == 1


def test_token_score_defaults_to_the_reference_and_reaches_the_sparse_layers():
    assert TailorKVConfig().token_score == TAILORKV_1.token_score == TAILORKV_2.token_score == "group_mean"
    assert "token_score='group_mean'" in repr(TAILORKV_1)
    # Eager, on random K/V, without offload: a jitted decode step would compile once per mode.
    rng = np.random.default_rng(2)
    k, v = (jnp.asarray(rng.normal(size=(1, CFG.num_kv_heads, 301, CFG.head_dim)), jnp.float32) for _ in range(2))
    dense = DenseKVCache(k=(k,) * 3, v=(v,) * 3, length=jnp.asarray(300), start=jnp.zeros((1,), jnp.int32))
    q = jnp.asarray(rng.normal(size=(1, 1, CFG.num_heads, CFG.head_dim)), jnp.float32)
    channels = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (1, CFG.num_kv_heads, 8))
    tight = TailorKVConfig(budget=72, sink=8, recent=56, quantized_layers=(), offload=False)  # 8 retrieved tokens
    k_new, v_new = k[:, :, :1].swapaxes(1, 2), v[:, :, :1].swapaxes(1, 2)  # [B, T=1, Hkv, hd]
    outs = []
    for mode in ("group_mean", "head_max"):
        cache = dataclasses.replace(tight, token_score=mode).after_prefill(CFG, dense, 300)
        outs.append(np.asarray(cache._attend_sparse(cache.layers[1], q, k_new, v_new, channels)[0]))
    assert not np.allclose(*outs)
