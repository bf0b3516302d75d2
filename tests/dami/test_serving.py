"""Static serving (serve_static, the engine's baseline): bucketed and mixed strategies against
per-prompt generation on theta(lambda_i), RowMix endpoints, TailorKV caches, per-prompt keys, the
cost model's choice, and bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dami_jax as dj
from dami_jax.dami.serving import CostModel, Workload, choose_strategy, group_rows, serve_static
from dami_jax.evals.prompts import prompt_tokens
from dami_jax.models.rowmix import RowMix, mix_rows
from dami_jax.toy.evaluation import toy_problems

pytestmark = pytest.mark.usefixtures("highest_precision")

LAMBDAS = [0.0, 1.0, 0.3, 0.45, 0.5, 0.7, 0.3, 1.0]
NEW = 80  # enough for the thinking answers of these problems to finish
# Toy head_dim is 32: groups of 32; budget 24 < the ~40-token prompts, so top-k retrieval runs.
TAILORKV = dj.TailorKVConfig(
    bits=2, budget=24, sink=4, recent=8, num_channels=8, group=32, residual=64, quantized_layers=(0,)
)


@pytest.fixture(scope="module")
def pair():
    return dj.load_toy_pair()


@pytest.fixture(scope="module")
def prompts(pair):
    tokenizer = pair.tokenizers["thinking"]
    return [prompt_tokens(tokenizer, p, "toy") for p in toy_problems(2)[:8]]  # levels 1-4


def alone(pair, prompt, lam, **options):
    """One prompt generated on its own on the materialized theta(lam)."""
    return dj.generate(dj.interpolate(pair.instruct, pair.thinking, lam), pair.cfg, [prompt], **options)


def test_mixed_and_bucketed_equal_per_prompt_generation(pair, prompts):
    mixed = serve_static(pair, prompts, LAMBDAS, strategy="mixed", max_new_tokens=NEW)
    bucketed = serve_static(pair, prompts, LAMBDAS, strategy="bucketed", max_new_tokens=NEW, progress=True)
    expected = [alone(pair, p, lam, max_new_tokens=NEW) for p, lam in zip(prompts, LAMBDAS)]
    assert mixed.tokens.shape == bucketed.tokens.shape == bucketed.logprobs.shape == (len(prompts), NEW)
    assert mixed.token_lists() == bucketed.token_lists() == [e.token_lists()[0] for e in expected]
    np.testing.assert_array_equal(mixed.lengths, bucketed.lengths)
    np.testing.assert_array_equal(bucketed.tokens, np.concatenate([e.tokens for e in expected]))
    np.testing.assert_allclose(mixed.logprobs, bucketed.logprobs, atol=1e-4)
    assert all(row[-1] in pair.cfg.eos_token_ids for row in bucketed.token_lists())  # every answer finished
    assert len(set(np.asarray(bucketed.lengths).tolist())) > 2  # and rows stopped at different steps
    # auto follows its cost model: fixed cost per step dominates, six groups -> mixed
    fixed_heavy = CostModel(single_fixed=1.0, single_per_row=0.0, mixed_fixed=1.5, mixed_per_row=0.0, interpolation=0.0)
    auto = serve_static(pair, prompts, LAMBDAS, max_new_tokens=NEW, cost_model=fixed_heavy)
    np.testing.assert_array_equal(auto.logprobs, mixed.logprobs)


def test_rowmix_endpoints_are_exact_and_the_middle_is_close(pair, prompts):
    tokens = jnp.asarray([p[:30] for p in prompts[:4]], jnp.int32)
    for lam, endpoint in ((0.0, pair.instruct), (1.0, pair.thinking)):
        mixed = dj.forward(mix_rows(pair.instruct, pair.thinking, jnp.full(4, lam)), pair.cfg, tokens)
        np.testing.assert_array_equal(mixed, dj.forward(endpoint, pair.cfg, tokens))
    lam = jnp.asarray([0.0, 0.25, 0.6, 1.0])
    mixed = np.asarray(dj.forward(mix_rows(pair.instruct, pair.thinking, lam), pair.cfg, tokens))
    for row, value in enumerate(lam.tolist()):
        theta = dj.interpolate(pair.instruct, pair.thinking, value)
        np.testing.assert_allclose(mixed[row], dj.forward(theta, pair.cfg, tokens[row : row + 1])[0], atol=2e-4, rtol=0)


def test_rowmix_with_biases_and_an_untied_head():
    cfg = dj.ModelConfig(architecture="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=False)  # fmt: skip
    a, b = dj.init_params(cfg, jax.random.key(0), scale=0.3), dj.init_params(cfg, jax.random.key(1), scale=0.3)
    assert "q_bias" in a["layers"][0]["attn"] and "lm_head" in a
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (3, 12)), jnp.int32)
    mixed = np.asarray(dj.forward(mix_rows(a, b, jnp.asarray([0.0, 1.0, 0.5])), cfg, tokens))
    np.testing.assert_array_equal(mixed[0], dj.forward(a, cfg, tokens)[0])
    np.testing.assert_array_equal(mixed[1], dj.forward(b, cfg, tokens)[1])
    np.testing.assert_allclose(mixed[2], dj.forward(dj.interpolate(a, b, 0.5), cfg, tokens)[2], atol=1e-5, rtol=0)


def test_rowmix_is_a_pytree_with_the_first_weights_dtype_and_shape():
    mix = RowMix(jnp.zeros((3, 5), jnp.bfloat16), jnp.ones((3, 5), jnp.bfloat16), jnp.zeros(2))
    assert mix.dtype == jnp.bfloat16 and mix.shape == (3, 5)
    assert len(jax.tree.leaves(mix)) == 3


def test_tailorkv_cache_with_both_strategies(pair, prompts):
    rows, lambdas = prompts[4:7], [0.0, 0.5, 1.0]
    options = dict(max_new_tokens=64, cache=TAILORKV)
    expected = [alone(pair, p, lam, **options).token_lists()[0] for p, lam in zip(rows, lambdas)]
    assert serve_static(pair, rows, lambdas, strategy="bucketed", **options).token_lists() == expected
    assert serve_static(pair, rows, lambdas, strategy="mixed", **options).token_lists() == expected


def test_sampled_rows_follow_their_own_keys(pair, prompts):
    rows, lambdas = prompts[:4], [0.5, 1.0, 0.5, 0.0]
    keys = jax.random.split(jax.random.key(11), len(rows))
    options = dict(max_new_tokens=24, sampling=dj.Sampling(temperature=1.0, top_k=20), stop_tokens=[])
    bucketed = serve_static(pair, rows, lambdas, strategy="bucketed", key=keys, **options)
    for i, (prompt, lam) in enumerate(zip(rows, lambdas)):
        assert alone(pair, prompt, lam, key=keys[i : i + 1], **options).token_lists()[0] == bucketed.token_lists()[i]
    one_key = serve_static(pair, rows, lambdas, strategy="bucketed", key=jax.random.key(11), **options)  # split per prompt
    assert one_key.token_lists() == bucketed.token_lists()


def test_per_prompt_stop_tokens_follow_their_rows(pair, prompts):
    rows, lambdas = prompts[:3], [1.0, 0.0, 1.0]
    full = serve_static(pair, rows, lambdas, strategy="bucketed", max_new_tokens=NEW).token_lists()
    stops = [[row[2]] for row in full]  # each row stops on its own third token (or earlier)
    out = serve_static(pair, rows, lambdas, strategy="bucketed", max_new_tokens=NEW, stop_tokens=stops)
    assert out.token_lists() == [row[: row.index(stop[0]) + 1] for row, stop in zip(full, stops)]


# --------------------------------------------------------------------------- the cost model


def workload(group_sizes, interpolations=0):
    return Workload(group_sizes, interpolations, steps=4)


def test_choice_follows_the_cost_models_predictions():
    fixed_heavy = CostModel(single_fixed=1.0, single_per_row=0.01, mixed_fixed=2.0, mixed_per_row=0.02, interpolation=0.5)
    many = workload((1,) * 6, interpolations=4)
    assert choose_strategy(many, fixed_heavy) == "mixed"  # six loops of a fixed-cost step vs one twice as dear
    row_heavy = CostModel(single_fixed=0.01, single_per_row=1.0, mixed_fixed=0.02, mixed_per_row=2.0, interpolation=0.5)
    cases = ((workload((1, 1)), fixed_heavy), (workload((30, 34), 1), fixed_heavy), (many, row_heavy), (workload((5, 5, 5)), row_heavy))
    for work, model in cases:
        predicted = model.predict(work)
        assert choose_strategy(work, model) == min(predicted, key=predicted.get)
    assert choose_strategy(workload((64,)), fixed_heavy) == "bucketed"  # one lambda: the plain single-model path


def test_predictions_by_hand():
    model = CostModel(single_fixed=5.0, single_per_row=2.0, mixed_fixed=7.0, mixed_per_row=3.0, interpolation=11.0)
    work = workload((2, 3), interpolations=1)  # 4 steps; each group is padded to 8 rows
    assert model.bucketed(work) == 2 * 4 * (5 + 2 * 8) + 11
    assert model.mixed(work) == 4 * (7 + 3 * 5)  # 88 < 179
    assert choose_strategy(work, model) == "mixed"
    assert [group_rows(n) for n in (1, 8, 9, 17)] == [8, 8, 16, 24]


def test_workload_of_a_batch():
    work = Workload.of(LAMBDAS, NEW)
    assert work.group_sizes == (1, 2, 1, 1, 1, 2) and work.interpolations == 4 and work.steps == NEW


def test_measured_cost_model_is_positive_and_cached(pair):
    model = CostModel.measure(pair)
    assert model.single_fixed + model.single_per_row > 0 and model.mixed_fixed + model.mixed_per_row > 0
    assert model.interpolation > 0
    assert CostModel.measure(pair) is model


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "lambdas, kwargs, match",
    [
        ([0.5], {}, "lambdas: need one lambda per prompt"),
        ([0.5, float("nan")], {}, "lambdas: row 1 is not finite"),
        ([0.5, float("inf")], {}, "lambdas: row 1 is not finite"),
        ([1.2, 0.5], {}, "lambdas: row 0 .* outside"),
        ([0.5, -0.1], {}, "lambdas: row 1 .* outside"),
        ([0.5, 0.5], dict(strategy="fastest"), "strategy"),
        ([0.5, 0.5], dict(sampling=dj.Sampling(temperature=1.0)), "key"),
        ([0.5, 0.5], dict(key=jax.random.split(jax.random.key(0), 3)), "key"),
        ([0.5, 0.5], dict(stop_tokens=[[1], [2], [3]]), "stop_tokens"),
        ([0.5, 0.5], dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_bad_inputs_name_the_argument(pair, prompts, lambdas, kwargs, match):
    with pytest.raises(ValueError, match=match):
        serve_static(pair, prompts[:2], lambdas, **kwargs)


def test_empty_prompt_list_and_extrapolation(pair, prompts):
    with pytest.raises(ValueError, match="prompts"):
        serve_static(pair, [], [], strategy="bucketed")
    out = serve_static(pair, prompts[:1], [1.2], strategy="bucketed", max_new_tokens=NEW, extrapolate=True)
    theta = dj.interpolate(pair.instruct, pair.thinking, 1.2, extrapolate=True)
    expected = dj.generate(theta, pair.cfg, prompts[:1], max_new_tokens=NEW)
    assert out.token_lists() == expected.token_lists()
