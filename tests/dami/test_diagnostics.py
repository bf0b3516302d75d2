"""Pilot-study diagnostics: linear CKA, continuity along the path, loss barrier."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dami_jax as dj
from dami_jax.dami.diagnostics import hidden_states, linear_cka, loss_along_path, representation_continuity
from dami_jax.dami.pair import ModelPair
from dami_jax.evals.plots import plot_diagnostics
from dami_jax.models.config import ModelConfig
from dami_jax.models.model import rms_norm

CFG = ModelConfig(architecture="qwen3", vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=128)  # fmt: skip


def make_pair(distance: float) -> ModelPair:
    a = dj.init_params(CFG, jax.random.key(0), scale=0.2)
    noise = dj.init_params(CFG, jax.random.key(1), scale=0.2)
    b = jax.tree.map(lambda x, n: x + distance * n, a, noise)
    return ModelPair(CFG, a, b, tokenizers={}, paths={})


SEQUENCES = [list(range(3, 23)), list(range(10, 40, 2)), [5, 9, 2, 7, 7, 1, 30, 31]]


def test_linear_cka_properties():
    x = jax.random.normal(jax.random.key(0), (200, 16))
    rotation = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (16, 16)))[0]
    assert float(linear_cka(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(linear_cka(x, 3.0 * x @ rotation + 2.0)) == pytest.approx(1.0, abs=1e-4)  # invariances
    unrelated = jax.random.normal(jax.random.key(2), (200, 16))
    assert float(linear_cka(x, unrelated)) < 0.2


def test_hidden_states_end_where_the_decoder_does():
    pair = make_pair(0.0)
    tokens = jnp.asarray([SEQUENCES[0]])
    states = hidden_states(pair.instruct, CFG, tokens)
    assert states.shape == (CFG.num_layers + 1, 1, 20, CFG.hidden_size)
    np.testing.assert_allclose(states[0], pair.instruct["embed"][tokens], rtol=1e-6)
    hidden, _ = dj.decoder(pair.instruct, CFG, tokens)  # the same layer loop: normed, the last state is the output
    np.testing.assert_allclose(rms_norm(states[-1], pair.instruct["final_norm"], CFG.rms_norm_eps), hidden, atol=1e-5)


def test_continuity_and_connectivity_on_identical_and_distant_pairs(tmp_path):
    same = make_pair(0.0)
    continuity = representation_continuity(same, SEQUENCES, lambdas=(0.0, 0.5, 1.0), delta=0.25)
    np.testing.assert_allclose(continuity.next_cka[:-1], 1.0, atol=1e-4)
    assert np.isnan(continuity.next_cka[-1]).all()  # theta(1 + delta) is off the path: no self-comparison at the end
    connectivity = loss_along_path(same, SEQUENCES, [[True] * len(s) for s in SEQUENCES], lambdas=(0.25, 0.5))
    assert connectivity.lambdas == (0.0, 0.25, 0.5, 1.0)
    assert abs(connectivity.barrier) < 1e-5

    far = make_pair(3.0)
    continuity = representation_continuity(far, SEQUENCES, lambdas=(0.0, 0.5, 1.0), delta=0.25)
    assert continuity.instruct_cka[0].min() == pytest.approx(1.0, abs=1e-4)  # lam = 0 is theta_I
    assert continuity.thinking_cka[-1].min() == pytest.approx(1.0, abs=1e-4)
    assert continuity.instruct_cka[-1, -1] < 0.99  # the far end has moved away
    connectivity = loss_along_path(far, SEQUENCES, [[True] * len(s) for s in SEQUENCES], lambdas=(0.5,))
    assert connectivity.losses[0] == pytest.approx(connectivity.linear[0])  # the line meets the endpoints
    assert plot_diagnostics(continuity, connectivity, tmp_path / "d.png").stat().st_size > 0
