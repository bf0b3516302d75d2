"""TailorKV cache: config errors, exactness limits, quantized bookkeeping, host offload, token
scoring. The presets against dense: test_peaked.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    largest,
    select_channels,
    token_scores,
)
from dami_jax.tailorkv.prompt_store import over_units, unit_rows

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
        (dict(kernel="cuda"), r"kernel must be one of \('auto', 'xla', 'pallas', 'triton'\)"),
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


def test_quantized_store_and_ring_follow_the_reference_schedule():
    """Layer 0's keys depend only on the tokens, so its stores can be checked against the dense
    cache row by row through several key flushes: keys of whole R-blocks are quantized (within
    scale/2), the newer n % R exact; values are quantized on arrival, the last R exact in the ring."""
    config = TailorKVConfig(bits=4, quantized_layers=(0,), scale_dtype="float32")
    tokens, start, size = prepare_prompts(prompts(260, 200), CFG, max_new_tokens=160)
    _, dense = build_cache(PARAMS, tokens, start, cfg=CFG, cache_size=size)
    _, tkv = build_cache(PARAMS, tokens, start, cfg=CFG, cache_size=size, cache_config=config)
    step = jax.jit(decode_step, static_argnums=1)
    feed = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (160, 2)), jnp.int32)
    for token in feed:
        _, dense = step(PARAMS, CFG, token, dense)
        _, tkv = step(PARAMS, CFG, token, tkv)
    layer: QuantizedLayerCache = tkv.layers[0]
    r, window = config.residual, config.residual + 1
    keys, values = np.asarray(layer.keys.dequantize()), np.asarray(layer.values.dequantize())
    key_scale = np.repeat(np.asarray(layer.keys.scale), config.group, axis=2)
    value_scale = np.repeat(np.asarray(layer.values.scale), config.group, axis=3)
    for row, first in enumerate(np.asarray(start)):
        k_row = np.asarray(dense.k[0])[row, :, first : int(dense.length)]
        v_row = np.asarray(dense.v[0])[row, :, first : int(dense.length)]
        n = k_row.shape[1]
        quantized = n // r * r
        assert np.all(np.abs(keys[row, :, :quantized] - k_row[:, :quantized]) <= key_scale[row, :, :quantized] / 2 + 1e-5)
        assert np.all(np.abs(values[row, :, :n] - v_row) <= value_scale[row, :, :n] / 2 + 1e-5)
        ring = [s % window for s in range(n - r, n)]  # the last R tokens (R + 1 during a step)
        np.testing.assert_array_equal(np.asarray(layer.v_window)[row][:, ring], v_row[:, n - r :])
        exact = [s % window for s in range(quantized, n)]
        np.testing.assert_array_equal(np.asarray(layer.k_window)[row][:, exact], k_row[:, quantized:])
        served = [s % window for s in range(n - r, quantized)]  # ring keys of quantized tokens: dequantized
        np.testing.assert_allclose(np.asarray(layer.k_window)[row][:, served], keys[row][:, n - r : quantized], atol=1e-6)


def test_left_padding_never_changes_quantization():
    """The same K/V rows placed after different amounts of padding (pad slots full of outliers)
    give identical scales, zeros and codes for their real tokens, and identical rings, after
    prefill and after decode steps through a key flush; so attention outputs agree too."""
    config = TailorKVConfig(bits=2, group=32, residual=64, quantized_layers=(0,), sink=4, recent=8, budget=24)
    cfg = dataclasses.replace(CFG, num_layers=1)
    rng = np.random.default_rng(0)
    n, size = 150, 256
    k_real, v_real = rng.normal(size=(2, 1, cfg.num_kv_heads, n, cfg.head_dim)).astype(np.float32)
    steps = [
        (rng.normal(size=(1, 1, cfg.num_heads, cfg.head_dim)), *rng.normal(size=(2, 1, 1, cfg.num_kv_heads, cfg.head_dim)))
        for _ in range(50)  # crosses the key flush at 192 tokens
    ]

    def prefilled(pad):
        k = np.full((1, cfg.num_kv_heads, size, cfg.head_dim), 50.0, np.float32)
        v = np.full_like(k, -50.0)
        k[:, :, pad : pad + n], v[:, :, pad : pad + n] = k_real, v_real
        dense = DenseKVCache(k=(jnp.asarray(k),), v=(jnp.asarray(v),), length=jnp.asarray(pad + n, jnp.int32),
                             start=jnp.asarray([pad], jnp.int32))  # fmt: skip
        return config.after_prefill(cfg, dense, pad + n)

    def decoded(cache):
        outs = []
        for q, k, v in steps:
            out, cache = cache.attend(0, *(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
            cache = cache.advance(1)
            outs.append(np.asarray(out))
        return cache, np.stack(outs)

    def assert_same_real_tokens(a, b):
        la, lb = a.layers[0], b.layers[0]
        tokens = int(a.length[0])
        keys_final = tokens // config.residual * config.residual  # whole R-blocks
        for name, final, groups in [("keys", keys_final, keys_final // config.group), ("values", tokens, tokens)]:
            qa, qb = getattr(la, name), getattr(lb, name)
            for field in ("scale", "zero"):
                np.testing.assert_array_equal(np.asarray(getattr(qa, field))[:, :, :groups],
                                              np.asarray(getattr(qb, field))[:, :, :groups], err_msg=f"{name}.{field}")  # fmt: skip
            np.testing.assert_array_equal(np.asarray(qa.dequantize())[:, :, :final], np.asarray(qb.dequantize())[:, :, :final])
        np.testing.assert_array_equal(np.asarray(la.k_window), np.asarray(lb.k_window))
        np.testing.assert_array_equal(np.asarray(la.v_window), np.asarray(lb.v_window))

    alone, padded = prefilled(0), prefilled(37)
    assert_same_real_tokens(alone, padded)
    (alone, out_alone), (padded, out_padded) = decoded(alone), decoded(padded)
    assert int(alone.length[0]) >= 192  # a key flush happened
    assert_same_real_tokens(alone, padded)
    np.testing.assert_array_equal(out_alone, out_padded)


def test_sparse_prompt_kv_lives_in_host_memory_and_device_bytes_shrink():
    tokens, start, size = prepare_prompts(prompts(900), CFG, max_new_tokens=32)
    _, dense = build_cache(PARAMS, tokens, start, cfg=CFG, cache_size=size)
    _, tkv = build_cache(PARAMS, tokens, start, cfg=CFG, cache_size=size, cache_config=TAILORKV_1)
    assert isinstance(tkv.layers[1], SparseLayerCache)
    store = tkv.prompts[1]
    assert store.k.sharding.memory_kind == store.kt.sharding.memory_kind == "pinned_host"
    assert store.kt.shape == (1, CFG.num_kv_heads, CFG.head_dim, 1024)  # 900 tokens, row-local, in whole 512-token blocks
    assert tkv.layers[1].k_window.sharding.memory_kind == "device"
    (dense_device, dense_host), (tkv_device, tkv_host) = cache_bytes(dense), cache_bytes(tkv)
    assert tkv_device * 3 < dense_device
    stored = [3 if isinstance(layer, SparseLayerCache) else 2 for layer in tkv.layers]  # k, v (and k transposed)
    assert dense_host == 0 and tkv_host == sum(n * store.k.nbytes for n, store in zip(stored, tkv.prompts))


def test_cache_costs_plot(tmp_path):
    tokens, start, size = prepare_prompts(prompts(300), CFG, max_new_tokens=8)
    costs = []
    for name, config in (("dense", DenseCacheConfig()), ("TailorKV-1", TAILORKV_1)):
        _, cache = build_cache(PARAMS, tokens, start, cfg=CFG, cache_size=size, cache_config=config)
        on_device, on_host = cache_bytes(cache)
        costs.append({"config": name, "device_bytes": on_device, "host_bytes": on_host, "seconds": 0.01 * (len(costs) + 1)})
    assert plot_cache_costs(costs, tmp_path / "costs.png").stat().st_size > 1000


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
        outs.append(np.asarray(cache._attend_sparse(cache.layers[1], cache.prompts[1], q, k_new, v_new, channels)[0]))
    assert not np.allclose(*outs)


def test_kernel_choice_is_resolved_once_per_backend_and_store():
    cfg96 = dataclasses.replace(CFG, head_dim=96, hidden_size=96)  # not a power of two: the kernels cannot read it
    auto = TailorKVConfig(group=32, residual=128)
    assert auto.kernel_for(CFG, "cpu") == "xla" and auto.kernel_for(CFG, "gpu") == "pallas"
    assert auto.kernel_for(cfg96, "gpu") == "xla"
    assert TailorKVConfig(kernel="pallas").kernel_for(CFG, "cpu") == "pallas"  # interpreted
    with pytest.raises(ValueError, match="kernel='pallas' cannot read this cache: head_dim=96"):
        TailorKVConfig(kernel="pallas", group=32, residual=128).kernel_for(cfg96, "gpu")
    with pytest.raises(ValueError, match="kernel='triton' runs through jax-triton on a CUDA GPU"):
        run(TailorKVConfig(kernel="triton"), prompts(100))
    assert "kernel='auto'" in repr(auto)


def test_pallas_kernels_give_the_xla_tokens():
    """The whole TailorKV decode (quantized attention, sparse token scores, segment attention)
    through the Pallas kernels, interpreted on CPU, past a key flush: the same greedy tokens."""
    rows = prompts(300, 230)
    config = TailorKVConfig(bits=2, budget=96, sink=8, recent=24, residual=64, quantized_layers=(0,))
    xla, pallas = run(config, rows, new=70), run(dataclasses.replace(config, kernel="pallas"), rows, new=70)
    np.testing.assert_array_equal(pallas.tokens, xla.tokens)
    np.testing.assert_allclose(pallas.logprobs, xla.logprobs, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(0, 5), min_size=1, max_size=9), group=st.integers(1, 9))
def test_host_reads_cover_each_live_unit_once_in_unpadded_transfers(counts, group):
    """A decode step's host reads (:func:`over_units`): every unit of the decoding rows read once,
    none past them (an idle row has no units), transfers of ``group`` units and then of powers of
    two, so no transfer is padded; :func:`unit_rows` names each unit's row and place in it."""
    counts = jnp.asarray(counts, jnp.int32)
    total = int(counts.sum())

    def read(start, size: int, carry):
        visits, sizes = carry
        units = start + jnp.arange(size)
        rows, index = unit_rows(units, counts)
        visits = visits.at[rows, index].add(1, mode="drop")  # a unit past the list would land out of bounds
        return visits, sizes.at[size].add(1)

    visits, sizes = over_units(counts.sum(), group, read, (jnp.zeros((len(counts), 6), jnp.int32), jnp.zeros(group + 1, jnp.int32)))
    expected = (jnp.arange(6)[None, :] < counts[:, None]).astype(jnp.int32)
    np.testing.assert_array_equal(visits, expected)
    sizes = np.asarray(sizes)
    assert sizes[group] == total // group and sum(size * n for size, n in enumerate(sizes)) == total
    assert all(n <= 1 and size & (size - 1) == 0 for size, n in enumerate(sizes[:group]) if n)  # one of each power of two


def test_an_idle_row_fetches_nothing_and_leaves_the_decoding_rows_as_they_were():
    """Three rows of 1100, 700 and 400 prompt tokens in host memory; the middle one idle: the
    others' top-k tokens are what they are with every row decoding, and the idle row's are never
    fetched (zeros, although its store holds random keys and values)."""
    rng = np.random.default_rng(4)
    k, v = (jnp.asarray(rng.normal(size=(3, CFG.num_kv_heads, 1100, CFG.head_dim)), jnp.float32) for _ in range(2))
    dense = DenseKVCache(k=(k,) * 3, v=(v,) * 3, length=jnp.asarray(1100), start=jnp.asarray([0, 400, 700], jnp.int32))
    cache = TailorKVConfig(budget=128, sink=8, recent=56, quantized_layers=(0,)).after_prefill(CFG, dense, 1100)
    assert cache.prompts[1].k.sharding.memory_kind == "pinned_host"
    q = jnp.asarray(rng.normal(size=(3, 1, CFG.num_heads, CFG.head_dim)), jnp.float32)
    channels = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (3, CFG.num_kv_heads, 8))
    top_k = jax.jit(lambda cache: cache._top_k_tokens(cache.prompts[1], q, channels))
    k_all, v_all, mask_all = top_k(cache)
    k_busy, v_busy, mask_busy = top_k(cache.replace(active=jnp.asarray([True, False, True])))
    for every, busy in ((k_all, k_busy), (v_all, v_busy), (mask_all, mask_busy)):
        np.testing.assert_array_equal(busy[::2], every[::2])
    assert bool(mask_all[1].all()) and not bool(mask_busy[1].any())
    assert not np.any(k_busy[1]) and not np.any(v_busy[1]) and np.all(np.abs(k_all[1]) > 0)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), width=st.integers(1, 40), k=st.integers(1, 40), levels=st.integers(1, 5))
def test_largest_on_a_head_mesh_is_top_k_selected_on_each_device(seed, width, k, levels):
    """Scores [rows, Hkv, N] split over 2 devices by head, with ties everywhere and -inf (as the
    token selection's masked scores have): top_k's values and indices, and no gather of the
    scores (each device selects for its own heads)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, levels, (3, 2, width)).astype(np.float32)
    x[rng.random(x.shape) < 0.3] = -np.inf
    k = min(k, width)
    mesh = jax.make_mesh((2,), ("tp",))
    split = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "tp")))
    select = jax.jit(lambda scores: largest(scores, k, mesh))
    for expected, got in zip(jax.lax.top_k(jnp.asarray(x), k), select(split)):
        np.testing.assert_array_equal(expected, got)
    assert "all-gather(" not in select.lower(split).compile().as_text()
