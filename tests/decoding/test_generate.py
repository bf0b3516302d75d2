"""Generation: argument checks, per-row stopping, log-probs, sampling, and token truncation."""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MAX_POSITIONS, VOCAB, build_hf_model
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import dami_jax as dj
from dami_jax.decoding.sampling import Sampling, truncate_logits

pytestmark = pytest.mark.usefixtures("highest_precision")

PROMPTS = [[5, 17, 99, 4, 61, 200, 33, 8, 140, 71, 12], [250, 3, 77]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen-model")
    build_hf_model("qwen3", seed=2).save_pretrained(folder)
    cfg, params = dj.load_checkpoint(folder)
    assert cfg.max_position_embeddings == MAX_POSITIONS and cfg.vocab_size == VOCAB
    return cfg, params


@pytest.fixture(scope="module")
def unstopped(model):
    """Greedy tokens for PROMPTS without any stop token."""
    cfg, params = model
    return dj.generate(params, cfg, PROMPTS, max_new_tokens=16, stop_tokens=[])


def first_new_at(row: list[int], at_least: int) -> tuple[int, int]:
    """(index, token) of the first token at index >= at_least that did not occur before it."""
    for i in range(at_least, len(row)):
        if row[i] not in row[:i]:
            return i, row[i]
    pytest.skip("degenerate generation: no fresh token to stop on")


def forward_logprobs(params, cfg, prompt: list[int], new: list[int]) -> np.ndarray:
    """log p(new[i] | prompt + new[:i]) from one full causal forward pass."""
    seq = jnp.asarray([prompt + new], jnp.int32)
    logp = jax.nn.log_softmax(dj.forward(params, cfg, seq)[0], axis=-1)
    rows = np.arange(len(prompt) - 1, len(prompt) - 1 + len(new))
    return np.asarray(logp)[rows, new]


# --------------------------------------------------------------------------- argument checks


def test_cache_size_too_small(model):
    cfg, params = model
    with pytest.raises(ValueError, match="cache_size"):
        dj.generate(params, cfg, PROMPTS, max_new_tokens=8, cache_size=len(PROMPTS[0]) + 7)


def test_cache_size_exact_fits_and_matches_default(model, unstopped):
    """A cache just big enough (smaller than the 32-token prompt bucket) gives the same tokens."""
    cfg, params = model
    out = dj.generate(params, cfg, PROMPTS, max_new_tokens=16, stop_tokens=[], cache_size=len(PROMPTS[0]) + 16)
    assert out.token_lists() == unstopped.token_lists()


def test_exceeds_max_position_embeddings(model):
    cfg, params = model
    prompt = list(range(3, 3 + 250)) * 2  # 500 tokens
    with pytest.raises(ValueError, match="max_position_embeddings"):
        dj.generate(params, cfg, [prompt], max_new_tokens=MAX_POSITIONS - len(prompt) + 1)


@pytest.mark.parametrize("prompts", [[], [[]], [[1, 2], []]])
def test_empty_prompt(model, prompts):
    cfg, params = model
    with pytest.raises(ValueError, match="prompt"):
        dj.generate(params, cfg, prompts, max_new_tokens=2)


@pytest.mark.parametrize("bad", [VOCAB, -1, 10**6])
def test_out_of_vocab_token(model, bad):
    cfg, params = model
    with pytest.raises(ValueError, match=str(bad)):
        dj.generate(params, cfg, [[4, 5], [1, bad, 2]], max_new_tokens=2)


def test_sampling_needs_key(model):
    cfg, params = model
    with pytest.raises(ValueError, match="key"):
        dj.generate(params, cfg, PROMPTS, max_new_tokens=2, sampling=Sampling(temperature=1.0))


def test_bad_max_new_tokens_and_stop_rows(model):
    cfg, params = model
    with pytest.raises(ValueError, match="max_new_tokens"):
        dj.generate(params, cfg, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="stop_tokens"):
        dj.generate(params, cfg, PROMPTS, max_new_tokens=2, stop_tokens=[[1], [2], [3]])


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.5), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_settings(kwargs):
    with pytest.raises(ValueError):
        Sampling(**kwargs)


# --------------------------------------------------------------------------- stopping


def test_rows_are_independent_of_batching(model, unstopped):
    cfg, params = model
    alone = [dj.generate(params, cfg, [p], max_new_tokens=16, stop_tokens=[]).token_lists()[0] for p in PROMPTS]
    assert alone == unstopped.token_lists()


def test_per_row_stop_tokens(model, unstopped):
    cfg, params = model
    full = unstopped.token_lists()
    i0, t0 = first_new_at(full[0], 2)
    i1, t1 = first_new_at(full[1], 6)
    if t0 == t1 and i0 != i1:
        pytest.skip("the chosen stop tokens coincide")
    out = dj.generate(params, cfg, PROMPTS, max_new_tokens=16, stop_tokens=[[t0], [t1]])
    tokens, lengths, logprobs = (np.asarray(x) for x in (out.tokens, out.lengths, out.logprobs))
    assert lengths.tolist() == [i0 + 1, i1 + 1]  # the stop token counts
    assert out.token_lists() == [full[0][: i0 + 1], full[1][: i1 + 1]]
    for row, n in enumerate(lengths):
        assert (tokens[row, n:] == cfg.pad_token_id).all()
        assert (logprobs[row, n:] == 0).all()
        assert (logprobs[row, :n] < 0).all()
        np.testing.assert_allclose(logprobs[row, :n], np.asarray(unstopped.logprobs)[row, :n], atol=1e-5)
    # A row stops only on its own list: row 1 with row 0's stop token and vice versa.
    swapped = dj.generate(params, cfg, PROMPTS, max_new_tokens=16, stop_tokens=[[t1], [t0]])
    expect = [row.index(t) + 1 if t in row else 16 for row, t in zip(full, (t1, t0))]
    assert np.asarray(swapped.lengths).tolist() == expect


def test_shared_stop_list_and_default_eos(model, unstopped):
    cfg, params = model
    full = unstopped.token_lists()
    i0, t0 = first_new_at(full[0], 1)
    out = dj.generate(params, cfg, PROMPTS, max_new_tokens=16, stop_tokens=[t0, VOCAB + 5])
    expect = [row.index(t0) + 1 if t0 in row else 16 for row in full]
    assert np.asarray(out.lengths).tolist() == expect
    # Default: the checkpoint's EOS ids (from config.json / generation_config.json).
    assert cfg.eos_token_ids == (2,)
    i1, t1 = first_new_at(full[1], 3)
    eos_cfg = dataclasses.replace(cfg, eos_token_ids=(VOCAB + 1, t1))
    default = dj.generate(params, eos_cfg, PROMPTS, max_new_tokens=16)
    assert np.asarray(default.lengths).tolist() == [row.index(t1) + 1 if t1 in row else 16 for row in full]
    assert np.asarray(default.lengths)[1] == i1 + 1


def test_all_rows_stop_on_first_token(model, unstopped):
    cfg, params = model
    firsts = [[row[0]] for row in unstopped.token_lists()]
    out = dj.generate(params, cfg, PROMPTS, max_new_tokens=16, stop_tokens=firsts)
    assert np.asarray(out.lengths).tolist() == [1, 1]
    assert (np.asarray(out.tokens)[:, 1:] == cfg.pad_token_id).all()


# --------------------------------------------------------------------------- log-probs


def test_logprobs_match_forward(model, unstopped):
    cfg, params = model
    for prompt, new, lp in zip(PROMPTS, unstopped.token_lists(), np.asarray(unstopped.logprobs)):
        np.testing.assert_allclose(lp, forward_logprobs(params, cfg, prompt, new), atol=2e-4)
    # Greedy tokens are the argmax of the forward logits on the concatenated sequence.
    prompt, new = PROMPTS[1], unstopped.token_lists()[1]
    logits = np.asarray(dj.forward(params, cfg, jnp.asarray([prompt + new])))[0]
    np.testing.assert_array_equal(logits[len(prompt) - 1 : -1].argmax(-1), new)


def test_sampled_logprobs_and_top_k_support(model):
    """Sampled tokens come from the top-k set of the model's logits; log-probs are untempered."""
    cfg, params = model
    out = dj.generate(
        params, cfg, PROMPTS, max_new_tokens=12, stop_tokens=[], key=jax.random.key(3),
        sampling=Sampling(temperature=1.5, top_k=3),
    )  # fmt: skip
    for prompt, new, lp in zip(PROMPTS, out.token_lists(), np.asarray(out.logprobs)):
        np.testing.assert_allclose(lp, forward_logprobs(params, cfg, prompt, new), atol=2e-4)
        logits = np.asarray(dj.forward(params, cfg, jnp.asarray([prompt + new])))[0, len(prompt) - 1 : -1]
        top3 = np.argsort(-logits, axis=-1)[:, :3]
        assert all(t in row for t, row in zip(new, top3))


# --------------------------------------------------------------------------- sampling


def test_sampling_is_reproducible_and_key_dependent(model):
    cfg, params = model
    hot = Sampling(temperature=2.0)

    def run(seed):
        return dj.generate(params, cfg, PROMPTS, max_new_tokens=16, stop_tokens=[], sampling=hot, key=jax.random.key(seed))

    a, b = run(0), run(0)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.logprobs), np.asarray(b.logprobs))
    others = [np.asarray(run(s).tokens) for s in (1, 2)]
    assert any((o != np.asarray(a.tokens)).any() for o in others)


def test_per_row_keys_make_each_row_independent_of_the_batch(model):
    cfg, params = model
    hot = Sampling(temperature=2.0, top_k=20)
    keys = jax.random.split(jax.random.key(5), 2)
    together = dj.generate(params, cfg, PROMPTS, max_new_tokens=12, stop_tokens=[], sampling=hot, key=keys)
    for i, prompt in enumerate(PROMPTS):
        alone = dj.generate(params, cfg, [prompt], max_new_tokens=12, stop_tokens=[], sampling=hot, key=keys[i : i + 1])
        assert alone.token_lists()[0] == together.token_lists()[i]
    swapped = dj.generate(params, cfg, PROMPTS[::-1], max_new_tokens=12, stop_tokens=[], sampling=hot, key=keys[::-1])
    assert swapped.token_lists()[::-1] == together.token_lists()
    streamed = np.stack(list(dj.stream_tokens(params, cfg, PROMPTS, max_new_tokens=12, stop_tokens=[], sampling=hot, key=keys)))
    np.testing.assert_array_equal(streamed.T, np.asarray(together.tokens))
    with pytest.raises(ValueError, match="one per prompt"):
        dj.generate(params, cfg, PROMPTS, sampling=hot, key=jax.random.split(jax.random.key(0), 3))


@pytest.mark.parametrize("sampling", [Sampling(temperature=1.0, top_k=1), Sampling(temperature=0.7, top_p=1e-6)])
def test_degenerate_sampling_equals_greedy(model, unstopped, sampling):
    cfg, params = model
    out = dj.generate(params, cfg, PROMPTS, max_new_tokens=16, stop_tokens=[], sampling=sampling, key=jax.random.key(9))
    assert out.token_lists() == unstopped.token_lists()


def test_greedy_ignores_key(model, unstopped):
    cfg, params = model
    out = dj.generate(params, cfg, PROMPTS, max_new_tokens=16, stop_tokens=[], key=jax.random.key(42))
    assert out.token_lists() == unstopped.token_lists()


def test_same_bucket_does_not_recompile(model):
    cfg, params = model
    jitted = importlib.import_module("dami_jax.decoding.generation")._generate
    if not hasattr(jitted, "_cache_size"):
        pytest.skip("this jax version does not expose the jit cache size")
    dj.generate(params, cfg, [[7, 8, 9]], max_new_tokens=5, stop_tokens=[])
    before = jitted._cache_size()
    dj.generate(params, cfg, [[10, 11, 12, 13, 14, 15, 16]], max_new_tokens=5, stop_tokens=[])
    dj.generate(params, cfg, [[1] * 30], max_new_tokens=5, stop_tokens=[])
    assert jitted._cache_size() == before


# --------------------------------------------------------------------------- truncate_logits

_settings = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def distinct_logits():
    """float32 [B, V] with all entries distinct (no ties) and well spread."""
    return st.tuples(st.integers(1, 3), st.sampled_from([2, 5, 16, 50])).flatmap(
        lambda bv: hnp.arrays(
            np.float32, bv, unique=True,
            elements=st.integers(-4000, 4000).map(lambda i: np.float32(i / 400)),
        )  # fmt: skip
    )


@_settings
@given(logits=distinct_logits(), data=st.data())
def test_top_k_keeps_exactly_k_largest(logits, data):
    k = data.draw(st.integers(1, logits.shape[1]))
    out = np.asarray(truncate_logits(jnp.asarray(logits), k, None))
    kept = np.isfinite(out)
    assert (kept.sum(-1) == k).all()
    np.testing.assert_array_equal(out[kept], logits[kept])  # survivors unchanged
    assert (out[~kept] == -np.inf).all()
    for row, keep in zip(logits, kept):
        assert set(np.flatnonzero(keep)) == set(np.argsort(-row)[:k])


@_settings
@given(logits=distinct_logits(), p=st.floats(0.01, 1.0))
def test_top_p_keeps_smallest_prefix_reaching_p(logits, p):
    out = np.asarray(truncate_logits(jnp.asarray(logits), None, p))
    kept = np.isfinite(out)
    for row, keep in zip(logits.astype(np.float64), kept):
        order = np.argsort(-row)
        probs = np.exp(row[order] - row.max())
        probs /= probs.sum()
        mass = np.cumsum(probs)
        assume(np.min(np.abs(mass - p)) > 1e-5)  # float32 vs float64 at the boundary
        n = int(np.searchsorted(mass, p) + 1) if p < 1 else len(row)  # first prefix with mass >= p
        n = min(max(n, 1), len(row))
        assert keep.sum() >= 1
        assert set(np.flatnonzero(keep)) == set(order[:n])
    np.testing.assert_array_equal(out[kept], logits[kept])


@_settings
@given(logits=distinct_logits(), data=st.data())
def test_top_k_then_top_p(logits, data):
    """Both filters: the nucleus is taken within the top-k set, and keeps at least one token."""
    k = data.draw(st.integers(1, logits.shape[1]))
    p = data.draw(st.floats(0.01, 1.0))
    out = np.asarray(truncate_logits(jnp.asarray(logits), k, p))
    only_k = np.isfinite(np.asarray(truncate_logits(jnp.asarray(logits), k, None)))
    kept = np.isfinite(out)
    assert (kept.sum(-1) >= 1).all()
    assert not (kept & ~only_k).any()
    for row, keep in zip(logits, kept):  # survivors are the largest ones
        if (~keep).any():
            assert row[keep].min() > row[~keep].max()


def test_truncate_noops():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 10)), jnp.float32)
    np.testing.assert_array_equal(truncate_logits(logits, None, None), logits)
    np.testing.assert_array_equal(truncate_logits(logits, 10, 1.0), logits)
    np.testing.assert_array_equal(truncate_logits(logits, 50, None), logits)


def test_chunked_prefill_matches_one_shot(monkeypatch):
    import dami_jax.decoding.generation as generation
    from dami_jax.models.config import ModelConfig

    cfg = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024)  # fmt: skip
    params = dj.init_params(cfg, jax.random.key(0), scale=0.3)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 64, 300).tolist(), rng.integers(0, 64, 250).tolist()]
    one_shot = dj.generate(params, cfg, prompts, max_new_tokens=8, stop_tokens=[])
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 64)  # 300 tokens -> 5 chunks of 64 (left-padded to 320)
    generation._generate.clear_cache()
    chunked = dj.generate(params, cfg, prompts, max_new_tokens=8, stop_tokens=[])
    generation._generate.clear_cache()
    np.testing.assert_array_equal(chunked.tokens, one_shot.tokens)
    np.testing.assert_allclose(chunked.logprobs, one_shot.logprobs, atol=1e-5)


# --------------------------------------------------------------------------- streaming


def test_stream_tokens_match_generate(model, unstopped):
    cfg, params = model
    full = unstopped.token_lists()
    i1, t1 = first_new_at(full[1], 4)
    stop = [[], [t1]]  # row 1 stops early, row 0 runs to the end
    steps = np.stack(list(dj.stream_tokens(params, cfg, PROMPTS, max_new_tokens=16, stop_tokens=stop)))
    assert steps.shape == (16, 2)
    assert steps[:, 0].tolist() == full[0]
    assert steps[: i1 + 1, 1].tolist() == full[1][: i1 + 1] and (steps[i1 + 1 :, 1] == -1).all()
    sampling, key = Sampling(temperature=1.0, top_k=20), jax.random.key(7)
    sampled = dj.generate(params, cfg, PROMPTS, max_new_tokens=12, sampling=sampling, key=key, stop_tokens=[])
    streamed = np.stack(list(dj.stream_tokens(params, cfg, PROMPTS, max_new_tokens=12, sampling=sampling, key=key, stop_tokens=[])))
    np.testing.assert_array_equal(streamed.T, np.asarray(sampled.tokens))


def test_stream_stops_when_every_row_is_done(model, unstopped):
    cfg, params = model
    first = [row[0] for row in unstopped.token_lists()]
    steps = list(dj.stream_tokens(params, cfg, PROMPTS, max_new_tokens=16, stop_tokens=[[first[0]], [first[1]]]))
    assert len(steps) == 1 and steps[0].tolist() == first


def test_stream_text_pieces_add_up_to_the_decoded_answer():
    from dami_jax.evals.prompts import prompt_tokens
    from dami_jax.toy.pair import load_toy_pair

    pair = load_toy_pair()
    tokenizer = pair.tokenizers["thinking"]
    prompt = prompt_tokens(tokenizer, "a=37, b=a+9, c=b*2. c=?", style="toy")
    pieces = list(dj.stream_text(pair.thinking, pair.cfg, tokenizer, prompt, max_new_tokens=64))
    expected = dj.generate(pair.thinking, pair.cfg, [prompt], max_new_tokens=64).token_lists()[0]
    assert len(pieces) > 5 and "".join(pieces) == tokenizer.decode(expected, skip_special_tokens=True)
    assert "".join(pieces).endswith("Answer: 92")
