"""dj.interpolate: exact endpoints, midpoints, dtypes, no recompiles, errors, donation, sharding."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dami_jax as dj
from dami_jax.dami.interpolation import _mix_jit
from dami_jax.models.config import ModelConfig

CFG = ModelConfig(architecture="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128)  # fmt: skip


def pair(dtype=jnp.float32):
    return dj.init_params(CFG, jax.random.key(0), dtype), dj.init_params(CFG, jax.random.key(1), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_endpoints_are_bit_exact_and_dtype_is_kept(dtype):
    a, b = pair(dtype)
    chex.assert_trees_all_equal(dj.interpolate(a, b, 0.0), a, strict=True)
    chex.assert_trees_all_equal(dj.interpolate(a, b, 1.0), b, strict=True)
    assert all(x.dtype == dtype for x in jax.tree.leaves(dj.interpolate(a, b, 0.3)))


def test_midpoint_values_computed_in_float32():
    a, b = pair(jnp.bfloat16)
    mid = dj.interpolate(a, b, 0.25)
    for x, y, m in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(mid)):
        want = (0.75 * np.asarray(x, np.float32) + 0.25 * np.asarray(y, np.float32)).astype(jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(m), want)


def test_changing_lambda_never_recompiles():
    a, b = pair()
    dj.interpolate(a, b, 0.1)
    before = _mix_jit._cache_size()
    for lam in np.linspace(0, 1, 7):
        dj.interpolate(a, b, float(lam))
        dj.interpolate(a, b, jnp.float32(lam))
    assert _mix_jit._cache_size() == before


def test_traced_lambda_inside_jit():
    a, b = pair()
    f = jax.jit(lambda lam: dj.interpolate(a, b, lam)["embed"])
    np.testing.assert_allclose(f(0.5), 0.5 * a["embed"] + 0.5 * b["embed"], rtol=1e-6)


def test_task_vector_and_donated_output():
    a, b = pair(jnp.bfloat16)
    tau = dj.task_vector(a, b)
    assert all(t.dtype == jnp.float32 for t in jax.tree.leaves(tau))
    chex.assert_trees_all_equal(dj.interpolate(a, lam=0.0, task_vector=tau), a, strict=True)
    chex.assert_trees_all_equal(dj.interpolate(a, lam=1.0, task_vector=tau), b, strict=True)  # exact for bf16 weights
    theta = dj.interpolate(a, b, 0.2)
    old = theta
    theta = dj.interpolate(a, b, 0.6, out=theta)
    assert jax.tree.leaves(old)[0].is_deleted()  # buffers were reused, not a third model
    chex.assert_trees_all_equal(theta, dj.interpolate(a, b, 0.6), strict=True)
    theta = dj.interpolate(a, lam=0.6, task_vector=tau, out=theta)
    np.testing.assert_allclose(np.asarray(theta["embed"], np.float32), np.asarray(dj.interpolate(a, b, 0.6)["embed"], np.float32), atol=1e-2)


def test_errors_name_the_parameter_and_lambda():
    a, b = pair()
    with pytest.raises(ValueError, match="outside"):
        dj.interpolate(a, b, 1.5)
    with pytest.raises(ValueError, match="outside"):
        dj.interpolate(a, b, -0.1)
    np.testing.assert_allclose(dj.interpolate(a, b, 1.5, extrapolate=True)["final_norm"], 1.0)
    wrong_shape = jax.tree.map(lambda x: x, b)
    wrong_shape["layers"][1]["mlp"]["up"] = jnp.zeros((32, 65))
    with pytest.raises(ValueError, match="layers/1/mlp/up"):
        dj.interpolate(a, wrong_shape, 0.5)
    wrong_dtype = jax.tree.map(lambda x: x, b)
    wrong_dtype["embed"] = b["embed"].astype(jnp.bfloat16)
    with pytest.raises(ValueError, match="embed: dtype"):
        dj.interpolate(a, wrong_dtype, 0.5)
    missing = jax.tree.map(lambda x: x, b)
    del missing["layers"][0]["attn"]["q_norm"]
    with pytest.raises(ValueError, match="layers/0/attn/q_norm"):
        dj.interpolate(a, missing, 0.5)
    with pytest.raises(ValueError, match="exactly one"):
        dj.interpolate(a, lam=0.5)
    with pytest.raises(ValueError, match="lam must be a scalar"):
        dj.interpolate(a, b, jnp.array([0.2, 0.7]))


def test_out_may_not_alias_an_input():
    a, b = pair()
    tau = dj.task_vector(a, b)
    for out, inputs, name in ((a, (a, b), "theta_instruct"), (b, (a, b), "theta_thinking"), (dict(b), (a, b), "theta_thinking")):
        with pytest.raises(ValueError, match=f"out: shares parameter embed with {name}"):
            dj.interpolate(*inputs, 0.3, out=out)
    with pytest.raises(ValueError, match="shares parameter .* with task_vector"):
        dj.interpolate(a, lam=0.3, task_vector=tau, out=tau)
    assert not jax.tree.leaves(a)[0].is_deleted() and not jax.tree.leaves(b)[0].is_deleted()  # nothing was donated


def test_sharded_params_stay_sharded():
    assert len(jax.devices()) >= 4, "conftest sets 4 virtual CPU devices"
    mesh = dj.make_mesh(jax.devices()[:4])
    a, b = pair()
    sa, sb = dj.shard_params(a, CFG, mesh), dj.shard_params(b, CFG, mesh)
    theta = dj.interpolate(sa, sb, 0.4)
    q = theta["layers"][0]["attn"]["q"]
    assert q.sharding.is_equivalent_to(sa["layers"][0]["attn"]["q"].sharding, q.ndim)
    assert len(q.sharding.device_set) == 4
    chex.assert_trees_all_equal(jax.device_get(theta), jax.device_get(dj.interpolate(a, b, 0.4)), strict=True)
