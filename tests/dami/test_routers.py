"""DAMI's routers: preference rules, the oracle, Bradley-Terry, DAMI-Pref training and its
orbax folder (round trip, resume, refusing another model), query features."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dami_jax as dj
from dami_jax.dami.conf_router import ConfMap, draft_signals, js_divergence_bits
from dami_jax.dami.features import FeatureSpec, FeatureStore, query_features
from dami_jax.dami.oracle import oracle_choice
from dami_jax.dami.pref_router import (
    META_FILE,
    RouterInfo,
    RouterMismatchError,
    TrainConfig,
    bradley_terry_loss,
    load_pref_router,
    train_pref_router,
)  # fmt: skip
from dami_jax.dami.preferences import (
    Rollout,
    mean_tokens_per_lambda,
    outcome_table,
    prefer,
    preference_pairs,
    split_ids,
)
from dami_jax.errors import InputError
from dami_jax.models.model import observe_layers
from dami_jax.toy.evaluation import toy_problems
from dami_jax.toy.pair import load_toy_pair

# --------------------------------------------------------------------------- preference rules


def test_correct_beats_wrong_whatever_the_cost():
    right, wrong = Rollout(1.0, True, 90), Rollout(0.0, False, 10)
    assert prefer(right, wrong) == 1 and prefer(wrong, right) == -1


def test_between_correct_answers_fewer_tokens_wins():
    short, long = Rollout(0.0, True, 12), Rollout(1.0, True, 47)
    assert prefer(short, long) == 1 and prefer(long, short) == -1


def test_near_ties_and_two_wrong_answers_give_no_pair():
    assert prefer(Rollout(0.5, True, 47), Rollout(1.0, True, 50), margin=0.1) == 0  # 3 <= 0.1 * 50
    assert prefer(Rollout(0.5, True, 44), Rollout(1.0, True, 50), margin=0.1) == 1  # 6 > 5
    assert prefer(Rollout(0.0, False, 5), Rollout(1.0, False, 90)) == 0


def test_preference_pairs_index_the_grid():
    grid = (0.0, 0.5, 1.0)
    rollouts = [
        [Rollout(0.0, True, 10), Rollout(0.5, True, 40), Rollout(1.0, True, 41)],  # 0 beats 0.5 and 1; 0.5 ~ 1
        [Rollout(0.0, False, 10), Rollout(1.0, True, 40), Rollout(0.5, False, 12)],  # 1 beats 0 and 0.5
    ]
    pairs = preference_pairs(rollouts, grid)
    got = sorted(zip(pairs.query.tolist(), pairs.win.tolist(), pairs.lose.tolist()))
    assert got == [(0, 0, 1), (0, 0, 2), (1, 2, 0), (1, 2, 1)]
    assert len(pairs.subset([1])) == 2
    assert pairs.weight.tolist() == [1.0] * 4  # every pair alike by default
    weighed = preference_pairs(rollouts, grid, token_weight=0.25)
    by_pair = dict(zip(zip(weighed.query.tolist(), weighed.win.tolist(), weighed.lose.tolist()), weighed.weight.tolist()))
    assert by_pair == {(0, 0, 1): 0.25, (0, 0, 2): 0.25, (1, 2, 0): 1.0, (1, 2, 1): 1.0}  # only the token pairs weigh less
    assert weighed.subset([0]).weight.tolist() == [0.25, 0.25]
    with pytest.raises(ValueError, match="not on the grid"):
        preference_pairs([[Rollout(0.3, True, 1)]], grid)
    with pytest.raises(ValueError, match="token_weight"):
        preference_pairs(rollouts, grid, token_weight=0.0)


def test_split_is_by_id_alone():
    ids = [f"q{i}" for i in range(400)]
    train, evaluation = split_ids(ids, 0.5)
    assert set(train).isdisjoint(evaluation) and len(train) + len(evaluation) == 400
    assert 150 < len(evaluation) < 250
    sub_train, sub_eval = split_ids(ids[::3], 0.5)  # fewer ids present: each keeps its side
    assert set(sub_eval) == set(evaluation) & set(ids[::3]) and set(sub_train) <= set(train)


def test_mean_tokens_per_lambda():
    rollouts = {"a": [Rollout(0.0, True, 10), Rollout(1.0, True, 30)], "b": [Rollout(0.0, False, 20)]}
    np.testing.assert_allclose(mean_tokens_per_lambda(rollouts, (0.0, 0.5, 1.0)), [15, np.nan, 30])


def test_outcome_table_scores_a_routing():
    rollouts = [[Rollout(0.0, False, 10), Rollout(1.0, True, 40)], [Rollout(1.0, True, 30), Rollout(0.0, True, 12)]]
    table = outcome_table(rollouts, (0.0, 1.0))
    assert table.routed(np.asarray([1, 0])) == (1.0, 26.0)
    assert table.routed(np.asarray([0, 1])) == (0.5, 20.0)
    with pytest.raises(ValueError, match="cover 1 of the 2"):
        outcome_table([[Rollout(0.0, True, 1)]], (0.0, 1.0))


# --------------------------------------------------------------------------- oracle


def test_oracle_picks_the_cheapest_correct_lambda():
    answers = [Rollout(0.0, False, 10), Rollout(0.4, True, 40), Rollout(0.6, True, 38), Rollout(1.0, True, 38)]
    assert oracle_choice(answers) == Rollout(0.6, True, 38)  # fewest tokens; the tie goes to the smaller lambda
    assert oracle_choice([Rollout(0.0, False, 10), Rollout(1.0, False, 50)]).lam == 0.0  # all wrong: cheapest


# --------------------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_loss_and_gradient_by_hand():
    s_win, s_lose = jnp.asarray([2.0, 0.0]), jnp.asarray([0.0, 1.0])
    # -log sigmoid(2) and -log sigmoid(-1), averaged
    want = (np.log1p(np.exp(-2.0)) + np.log1p(np.exp(1.0))) / 2
    np.testing.assert_allclose(bradley_terry_loss(s_win, s_lose), want, rtol=1e-6)
    grad_win = jax.grad(bradley_terry_loss)(s_win, s_lose)
    sigmoid = lambda z: 1 / (1 + np.exp(-z))
    np.testing.assert_allclose(grad_win, [-sigmoid(-2.0) / 2, -sigmoid(1.0) / 2], rtol=1e-6)
    weighted = (3 * np.log1p(np.exp(-2.0)) + np.log1p(np.exp(1.0))) / 4  # a weighted mean of the same terms
    np.testing.assert_allclose(bradley_terry_loss(s_win, s_lose, jnp.asarray([3.0, 1.0])), weighted, rtol=1e-6)


# --------------------------------------------------------------------------- training on synthetic data

GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def synthetic(n: int, seed: int):
    """Queries whose cheapest correct lambda is a known function of feature 0 (the grid index
    floor(5 * u), u = sigmoid(feature 0), kept away from the bin edges so the rule is learnable
    exactly). A lambda is correct iff it is at least that; tokens grow with lambda."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, 6)).astype(np.float32)
    needed = rng.integers(0, len(GRID), n)
    u = (needed + 0.5 + rng.uniform(-0.35, 0.35, n)) / len(GRID)
    features[:, 0] = np.log(u / (1 - u))
    rollouts = [[Rollout(lam, g >= need, 10 + 20 * g) for g, lam in enumerate(GRID)] for need in needed]
    return features, rollouts, needed


def info_for(features, costs=(10, 30, 50, 70, 90)) -> RouterInfo:
    return RouterInfo(GRID, FeatureSpec(), "fp-instruct", {"template": "instruct", "style": "toy"}, costs, features.shape[1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    features, rollouts, needed = synthetic(600, seed=0)
    pairs = preference_pairs(rollouts, GRID)
    fit, val = pairs.subset(range(480)), pairs.subset(range(480, 600))
    folder = tmp_path_factory.mktemp("router")
    config = TrainConfig(hidden=32, max_epochs=40, patience=40, learning_rate=3e-2, batch_size=256)
    router = train_pref_router(features, fit, val, info_for(features), folder, config, data_id="synthetic", progress=False)
    return router, folder, features, needed, (fit, val, config)


def test_router_learns_a_known_rule(trained):
    router, _, features, needed, _ = trained
    assert router.history[-1]["val_accuracy"] > 0.95
    fresh, _, fresh_needed = synthetic(300, seed=1)
    chosen = router.lambdas(fresh)
    assert np.mean(chosen == np.asarray(GRID)[fresh_needed]) > 0.95  # the cheapest lambda that is still correct
    spread = router.lambdas(fresh, expectation=True)
    assert spread.min() >= 0.0 and spread.max() <= 1.0


def test_cost_weight_moves_queries_to_cheaper_lambdas(trained):
    router, _, features, _, _ = trained
    plain, thrifty = router.lambdas(features), router.lambdas(features, cost_weight=5.0)
    assert thrifty.mean() < plain.mean() and np.all(thrifty <= plain)  # costs grow with lambda here


@pytest.mark.parametrize("token_weight, routed", [(1.0, 0.0), (0.25, 1.0)])
def test_token_weight_puts_accuracy_first_across_alike_queries(tmp_path, token_weight, routed):
    """Queries the features cannot tell apart: lambda 0 is right on 60% of them at 10 tokens,
    lambda 1 on all at 50. Equal weights let the 60% "shorter" pairs outvote the 40% "right"
    pairs (route to 0: 60% accuracy); weighing token pairs at 0.25 routes to 1 (100%)."""
    grid = (0.0, 1.0)
    rollouts = [[Rollout(0.0, i % 5 < 3, 10), Rollout(1.0, True, 50)] for i in range(100)]
    features = np.ones((100, 3), np.float32)
    pairs = preference_pairs(rollouts, grid, token_weight=token_weight)
    info = RouterInfo(grid, FeatureSpec(), "fp", {"template": "instruct", "style": "toy"}, (10.0, 50.0), 3)
    config = TrainConfig(hidden=0, max_epochs=60, patience=60, learning_rate=3e-2)
    router = train_pref_router(features, pairs, pairs.subset([]), info, tmp_path, config, progress=False)
    assert set(router.lambdas(features).tolist()) == {routed}


def test_orbax_round_trip(trained):
    router, folder, features, _, _ = trained
    loaded = load_pref_router(folder, fingerprint="fp-instruct", grid=GRID)
    np.testing.assert_array_equal(loaded.scores(features), router.scores(features))
    assert loaded.info == router.info and loaded.history == router.history


def test_refuses_a_router_for_another_model_or_grid(trained):
    _, folder, *_ = trained
    with pytest.raises(RouterMismatchError, match="Instruct model fp-instruct"):
        load_pref_router(folder, fingerprint="fp-other")
    with pytest.raises(RouterMismatchError, match="lambda grid"):
        load_pref_router(folder, fingerprint="fp-instruct", grid=(0.0, 1.0))
    with pytest.raises(InputError, match="not a router folder"):
        load_pref_router(folder / "nothing")


def test_training_resumes_after_an_interruption(trained, tmp_path, monkeypatch):
    router, _, features, _, (fit, val, config) = trained
    from dami_jax.dami import pref_router

    calls = {"n": 0}
    real_step = pref_router._train_step

    def interrupted_step(*args):
        calls["n"] += 1
        if calls["n"] == 2 * (-(-len(fit) // config.batch_size)) + 1:  # the first step of epoch 3
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(pref_router, "_train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        train_pref_router(features, fit, val, info_for(features), tmp_path, config, data_id="synthetic", progress=False)
    assert not json.loads((tmp_path / META_FILE).read_text())["done"]
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:  # epoch 2's save landed before the interrupt returned
        assert manager.all_steps() == [2]
    with pytest.raises(InputError, match="did not finish"):
        load_pref_router(tmp_path)
    monkeypatch.setattr(pref_router, "_train_step", real_step)
    resumed = train_pref_router(features, fit, val, info_for(features), tmp_path, config, data_id="synthetic", progress=False)
    assert resumed.history[0] == router.history[0] and len(resumed.history) == len(router.history)
    np.testing.assert_allclose(resumed.scores(features), router.scores(features), rtol=1e-5, atol=1e-5)
    with pytest.raises(RouterMismatchError, match="other settings"):
        train_pref_router(features, fit, val, info_for(features), tmp_path, config, data_id="other records", progress=False)


def test_early_stopping_on_validation_routing_and_a_linear_scorer(tmp_path):
    features, rollouts, needed = synthetic(400, seed=2)
    pairs = preference_pairs(rollouts, GRID)
    validation = (np.arange(300, 400), outcome_table(rollouts[300:], GRID))
    config = TrainConfig(hidden=0, max_epochs=40, patience=40, learning_rate=1e-1)
    router = train_pref_router(features, pairs.subset(range(300)), pairs.subset(range(300, 400)), info_for(features), tmp_path,
                               config, validation=validation, progress=False)  # fmt: skip
    best = router.history[router.best_epoch - 1]
    assert best["routed_accuracy"] == max(row["routed_accuracy"] for row in router.history)
    chosen = np.searchsorted(GRID, router.lambdas(features[300:]))
    assert validation[1].routed(chosen) == (best["routed_accuracy"], best["routed_tokens"])  # the kept weights are that epoch's
    assert best["routed_accuracy"] > 0.9  # the rule is linear in feature 0's logit: a linear scorer learns it


def test_no_pairs_is_a_clear_error(tmp_path):
    features, rollouts, _ = synthetic(4, seed=0)
    empty = preference_pairs([[Rollout(0.0, False, 1)] for _ in rollouts], GRID)
    with pytest.raises(InputError, match="no training pairs"):
        train_pref_router(features, empty, empty, info_for(features), tmp_path, progress=False)


# --------------------------------------------------------------------------- features


def test_query_features_pool_the_models_own_layers(tmp_path):
    pair = load_toy_pair()
    tok = pair.tokenizers["instruct"]
    prompts = [tok.encode(p.question) for p in toy_problems(2)[:5]]
    spec = FeatureSpec(layers=("middle", "final"), pools=("mean", "last"))
    got = query_features(pair.instruct, pair.cfg, prompts, spec, batch_size=2)
    assert got.shape == (5, spec.dim(pair.cfg))
    layers = spec.layer_indices(pair.cfg)
    assert layers == (1, 3)
    for row, prompt in zip(got, prompts):  # each prompt alone, unpadded
        outs = observe_layers(pair.instruct, pair.cfg, jnp.asarray([prompt]), lambda v: v.output)
        want = np.concatenate([np.concatenate([outs[i][0].mean(0), outs[i][0][-1]]) for i in layers])
        np.testing.assert_allclose(row, want, rtol=2e-5, atol=2e-5)

    store = FeatureStore(tmp_path, "fp", spec)
    ids = [f"q{i}" for i in range(5)]
    computed = []

    def compute(missing):
        computed.extend(missing)
        return got[[ids.index(i) for i in missing]]

    np.testing.assert_array_equal(store.get(ids[:3], compute), got[:3])
    np.testing.assert_array_equal(store.get(ids[::-1], compute), got[::-1])
    assert computed == ids[:3] + ["q4", "q3"]  # the stored three were not computed again
    with pytest.raises(ValueError, match="layers 0..3"):
        FeatureSpec(layers=(7,)).layer_indices(pair.cfg)


# --------------------------------------------------------------------------- DAMI-Conf


def test_js_divergence_in_bits():
    p = jnp.log(jnp.asarray([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]) + 1e-30)
    q = jnp.log(jnp.asarray([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.5, 0.3, 0.2]]) + 1e-30)
    js = np.asarray(js_divergence_bits(p, q))
    np.testing.assert_allclose(js[:2], [0.0, 1.0], atol=1e-6)
    assert 0 < js[2] < 1
    np.testing.assert_allclose(js_divergence_bits(q, p), js, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(
    conf=st.lists(st.floats(0, 1), min_size=2, max_size=2), disc=st.lists(st.floats(0, 1), min_size=2, max_size=2),
    weights=st.tuples(st.floats(0, 3), st.floats(0, 3), st.floats(0, 0.5), st.floats(0, 1)),
)
def test_conf_map_is_monotone(conf, disc, weights):
    """Less confidence and more disagreement never lower lambda, nor make a draft acceptable."""
    mapping = ConfMap(*weights)
    lo_conf, hi_conf = max(conf), min(conf)  # the second query is less confident ...
    lo_disc, hi_disc = min(disc), max(disc)  # ... and the models disagree more on it
    lams, accept = mapping.route(np.asarray([lo_conf, hi_conf]), np.asarray([lo_disc, hi_disc]), GRID)
    assert lams[1] >= lams[0] or accept[0]  # an accepted draft is lambda 0 with no second answer
    assert not (accept[1] and not accept[0])
    assert set(lams.tolist()) <= set(GRID)


def test_conf_map_by_hand():
    mapping = ConfMap(conf_weight=1.0, disc_weight=2.0, accept_below=0.1, floor=0.5)
    lams, accept = mapping.route(np.asarray([0.98, 0.9, 0.6, 0.1]), np.asarray([0.01, 0.05, 0.2, 0.5]), GRID)
    # risks 0.04 (accept), 0.2 (-> floor 0.5), 0.8 (-> 1.0, rounded up), 1.9 (-> 1.0)
    assert accept.tolist() == [True, False, False, False]
    assert lams.tolist() == [0.0, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="ConfMap"):
        ConfMap(floor=1.5)


def test_draft_signals_on_the_toy_pair():
    pair = load_toy_pair()
    tok = pair.tokenizers["instruct"]
    from dami_jax.evals.prompts import prompt_tokens

    problems = toy_problems(1)
    prompts = [prompt_tokens(tok, p, "toy") for p in problems]
    signals = draft_signals(pair, prompts, max_draft_tokens=24, batch_size=4)
    out = dj.generate(pair.instruct, pair.cfg, prompts, max_new_tokens=24)
    assert signals.drafts == out.token_lists()
    probs = [np.exp(lp[:n]).mean() for lp, n in zip(np.asarray(out.logprobs), np.asarray(out.lengths))]
    np.testing.assert_allclose(signals.confidence, probs, rtol=1e-4)  # teacher forcing = the draft's own log-probs
    assert np.all((signals.discrepancy >= 0) & (signals.discrepancy <= 1))
    # Level 1 (a single operation) is what the Instruct model is sure of; level 6 it is not.
    assert signals.confidence[0] > signals.confidence[-1]
