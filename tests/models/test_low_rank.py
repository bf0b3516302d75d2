"""Low-rank updates: a zero update merges to the base bit for bit, the model with the update kept
beside its kernels computes the merged model, the exact merge is the same bits every time, and
files round-trip or are refused with their fault named."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dami_jax.errors import InputError
from dami_jax.models.config import ModelConfig
from dami_jax.models.low_rank import (
    LINEAR_KERNELS, LowRankKernel, apply_low_rank, check_fits, init_low_rank, load_low_rank, merge_low_rank_exact, save_low_rank,
    target_paths, update_bytes,
)  # fmt: skip
from dami_jax.models.model import forward
from dami_jax.models.params import fingerprint, init_params, iter_paths

CFG = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, tie_word_embeddings=True, max_position_embeddings=64,
                  eos_token_ids=(2,), pad_token_id=0)  # fmt: skip


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0), scale=0.1)


def moved(update, seed=1):
    """The update with random B (a trained one), so that A @ B is not zero."""
    keys = iter(jax.random.split(jax.random.key(seed), len(update)))
    return {p: {"a": f["a"], "b": 0.05 * jax.random.normal(next(keys), f["b"].shape)} for p, f in update.items()}


def test_targets_every_linear_kernel_of_every_layer(params):
    paths = target_paths(params)
    assert len(paths) == CFG.num_layers * len(LINEAR_KERNELS)
    assert "layers/1/mlp/down" in paths and not any("embed" in p or "norm" in p for p in paths)
    assert target_paths(params, ("attn/q",)) == ["layers/0/attn/q", "layers/1/attn/q"]


def test_a_zero_update_merges_to_the_base_bit_for_bit(params):
    update = init_low_rank(params, 4, jax.random.key(0))
    assert all(f["a"].shape[1] == f["b"].shape[0] == 4 for f in update.values())
    assert update_bytes(update) == 4 * sum(4 * (f["a"].shape[0] + f["b"].shape[1]) for f in update.values())
    assert fingerprint(merge_low_rank_exact(params, update)) == fingerprint(params)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 64, (2, 8)), jnp.int32)
    np.testing.assert_array_equal(forward(apply_low_rank(params, update), CFG, tokens), forward(params, CFG, tokens))


def test_the_merge_adds_a_times_b_and_leaves_the_rest(params):
    update = moved(init_low_rank(params, 3, jax.random.key(0)))
    exact = merge_low_rank_exact(params, update)
    for (path, w), (_, e) in zip(iter_paths(params), iter_paths(exact)):
        if path in update:
            want = np.asarray(w, np.float64) + np.asarray(update[path]["a"], np.float64) @ np.asarray(update[path]["b"], np.float64)
            np.testing.assert_allclose(e, want, rtol=0, atol=1e-6)
        else:
            assert e is w  # shared, not copied
    assert fingerprint(merge_low_rank_exact(params, update)) == fingerprint(exact)  # the same bits again


def test_the_model_with_the_update_beside_its_kernels_is_the_merged_model(params):
    update = moved(init_low_rank(params, 3, jax.random.key(0)))
    applied = apply_low_rank(params, update)
    assert isinstance(applied["layers"][1]["mlp"]["down"], LowRankKernel) and applied["embed"] is params["embed"]
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 64, (2, 8)), jnp.int32)
    merged = forward(merge_low_rank_exact(params, update), CFG, tokens)
    np.testing.assert_allclose(forward(applied, CFG, tokens), merged, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(merged - forward(params, CFG, tokens)).max()) > 1e-3  # the update changes the model


def test_training_sees_the_update_through_its_gradient(params):
    """B's gradient is not zero at the start (A is random), A's is (B is zero); and it is the
    gradient of the merged model's loss."""
    update = init_low_rank(params, 2, jax.random.key(0), ("attn/q",))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 64, (2, 8)), jnp.int32)

    def loss(u):
        return jnp.mean(forward(apply_low_rank(params, u), CFG, tokens) ** 2)

    grads = jax.grad(loss)(update)
    assert all(float(jnp.abs(g["b"]).max()) > 0 and float(jnp.abs(g["a"]).max()) == 0 for g in grads.values())
    path = "layers/0/attn/q"
    merged = jax.grad(lambda w: jnp.mean(forward(_with_q(params, w), CFG, tokens) ** 2))(params["layers"][0]["attn"]["q"])
    np.testing.assert_allclose(grads[path]["b"], update[path]["a"].T @ merged, rtol=1e-4, atol=1e-7)  # dL/dB = A^T dL/dW


def _with_q(params, q):
    return {**params, "layers": [{**params["layers"][0], "attn": {**params["layers"][0]["attn"], "q": q}}, *params["layers"][1:]]}


@settings(max_examples=10, deadline=None)
@given(rank=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_files_round_trip(tmp_path_factory, rank, seed):
    params = init_params(CFG, jax.random.key(seed % 7), scale=0.1)
    update = moved(init_low_rank(params, rank, jax.random.key(seed)), seed)
    path = save_low_rank(tmp_path_factory.mktemp("u") / "update.safetensors", update, {"base": "abc"})
    loaded, meta = load_low_rank(path)
    assert meta == {"base": "abc"} and loaded.keys() == update.keys()
    for p in update:
        for k in ("a", "b"):
            np.testing.assert_array_equal(loaded[p][k], update[p][k])
    check_fits(params, loaded, str(path))


def test_the_same_update_is_the_same_bytes(params, tmp_path):
    """safetensors alone writes metadata in hash order; a pinned file must not depend on it."""
    update = moved(init_low_rank(params, 2, jax.random.key(0), ("attn/q",)))
    metadata = {key: f"value {i}" for i, key in enumerate(("settings", "merged", "base", "zeta", "alpha", "mid"))}
    files = [save_low_rank(tmp_path / f"u{i}.safetensors", update, dict(reversed(metadata.items()) if i % 2 else metadata.items()))
             for i in range(6)]  # fmt: skip
    assert len({f.read_bytes() for f in files}) == 1
    assert load_low_rank(files[0])[1] == metadata
    assert files[0].read_bytes()[8:].startswith(b'{"__metadata__":{"alpha":"value 4","base":"value 2","merged"')


def test_bad_files_are_named(tmp_path, params):
    with pytest.raises(InputError, match="missing.safetensors: not a low-rank update file"):
        load_low_rank(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(InputError, match="junk.safetensors: not a low-rank update file"):
        load_low_rank(tmp_path / "junk.safetensors")
    update = init_low_rank(params, 2, jax.random.key(0), ("attn/q",))
    half = {"layers/0/attn/q": {"a": update["layers/0/attn/q"]["a"]}}
    path = save_low_rank(tmp_path / "half.safetensors", half)
    with pytest.raises(InputError, match="half.safetensors: every kernel needs both factors"):
        load_low_rank(path)


def test_an_update_for_another_model_is_refused(params):
    update = init_low_rank(params, 2, jax.random.key(0), ("attn/q",))
    with pytest.raises(InputError, match=r"src: layers/0/attn/q factors \(32, 2\) @ \(2, 32\) do not fit its kernel \(32, 16\)"):
        check_fits({**params, "layers": [{**layer, "attn": {**layer["attn"], "q": layer["attn"]["k"]}} for layer in params["layers"]]},
                   update, "src")  # fmt: skip
    with pytest.raises(InputError, match="src: the checkpoint has no kernel layers/5/attn/q"):
        check_fits(params, {"layers/5/attn/q": update["layers/0/attn/q"]}, "src")
