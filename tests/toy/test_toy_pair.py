"""The embedded toy Instruct/Thinking pair (dami_jax/toy/toy-pair) and its task generator."""

from __future__ import annotations

import numpy as np
import pytest

import dami_jax as dj
from dami_jax.evals.grading import extract_answer
from dami_jax.models.checkpoint import load_checkpoint
from dami_jax.models.tokenizer import THINK_CLOSE, chat_tokens, load_tokenizer
from dami_jax.toy import evaluation, task
from dami_jax.toy import tokenizer as toy_tokenizer
from dami_jax.toy.pair import toy_pair_paths
from dami_jax.toy.traces import render, toy_steps

pytestmark = pytest.mark.xdist_group("toy_pair")  # one worker loads and compiles once

N_PER_LEVEL = 30
MAX_NEW_TOKENS = 96


# ---- the task generator (fast) -----------------------------------------------------------


def test_generator_is_deterministic_per_seed():
    a, b = task.generate_problems(40, seed=3), task.generate_problems(40, seed=3)
    assert a == b
    assert [p.question for p in task.generate_problems(40, seed=4)] != [p.question for p in a]
    assert task.toy_benchmark(5, seed=1) == task.toy_benchmark(5, seed=1)


def test_problems_are_consistent_and_bounded():
    for p in task.generate_problems(300, seed=0):
        assert 1 <= p.steps <= task.MAX_STEPS and p.source == f"toy-{p.steps}"
        assert len(p.values) == p.steps + 1 and len(p.ops) == p.steps
        assert all(0 <= v <= task.MAX_VALUE for v in p.values)
        x = p.values[0]
        for (op, k), v in zip(p.ops, p.values[1:]):
            x = {"+": x + k, "-": x - k, "*": x * k}[op]
            assert x == v
        assert p.answer == p.values[-1] and p.intermediates == p.values[1:]
        assert p.steps == 1 or task.split_of(p.question) == "train"
        assert extract_answer(task.thinking_response(p), think_opened=True) == str(p.answer)
        assert task.well_formed(task.thinking_response(p), opened=True) and task.well_formed(task.instruct_response(p))
        assert not task.well_formed(task.thinking_response(p)) and not task.well_formed(task.instruct_response(p), opened=True)
        for think in (False, True):
            for opened in (False, True):
                assert task.well_formed(task.completion(p, think, opened).removesuffix(toy_tokenizer.IM_END), opened)


def test_benchmark_is_held_out_and_graded_by_level():
    bench = task.toy_benchmark(4, seed=0)
    assert [p.steps for p in bench] == [s for s in range(1, 7) for _ in range(4)]
    assert [p.id for p in bench[:4]] == [f"toy-1-{i}" for i in range(4)]
    assert all(task.split_of(p.question) == "test" for p in bench if p.steps > 1)
    assert len({p.question for p in bench}) == len(bench)
    assert extract_answer("b=3\n</think>\nAnswer: 4\nAnswer: -12", think_opened=True) == "-12"
    assert extract_answer("no answer") is None


def test_tokenizers_share_ids_and_differ_only_in_template():
    inst, think = toy_tokenizer.build_tokenizer(False), toy_tokenizer.build_tokenizer(True)
    assert inst.get_vocab() == think.get_vocab()
    q = task.toy_benchmark(1, seed=0)[-1].question
    ids_i, ids_t = chat_tokens(inst, q), chat_tokens(think, q)
    assert ids_t[: len(ids_i)] == ids_i
    assert think.decode(ids_t[len(ids_i) :]) == "<think>\n"
    assert inst.decode(ids_i) == toy_tokenizer.prompt_text(q, thinking=False)
    text = "b=3+4=7\n</think>\nAnswer: 7"
    ids = think.encode(text + toy_tokenizer.IM_END, add_special_tokens=False)
    assert len(ids) == len(text) - len("</think>") + 2
    assert think.decode(ids, skip_special_tokens=True) == text


# ---- the shipped pair ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    inst_dir, think_dir = toy_pair_paths()
    cfg_i, params_i = load_checkpoint(inst_dir)
    cfg_t, params_t = load_checkpoint(think_dir)
    assert cfg_i == cfg_t and cfg_i.architecture == "qwen3"
    return cfg_i, params_i, params_t, load_tokenizer(inst_dir), load_tokenizer(think_dir)


@pytest.fixture(scope="module")
def problems():
    return task.toy_benchmark(N_PER_LEVEL, seed=0, levels=(1, 6))


def _run(params, cfg, tok, problems):
    return evaluation.evaluate(params, cfg, tok, problems, max_new_tokens=MAX_NEW_TOKENS)


def _accuracy(results, steps):
    return np.mean([r.correct for r in results if r.problem.steps == steps])


def test_shipped_tokenizers_and_config(pair):
    cfg, _, _, tok_i, tok_t = pair
    assert tok_i.get_vocab() == tok_t.get_vocab() == toy_tokenizer.build_tokenizer(True).get_vocab()
    assert len(tok_i) == cfg.vocab_size
    assert cfg.eos_token_ids == (tok_i.convert_tokens_to_ids(toy_tokenizer.IM_END),)
    assert cfg.pad_token_id == tok_i.pad_token_id
    q = "a=5, b=a+3. b=?"
    assert tok_t.decode(chat_tokens(tok_t, q)) == toy_tokenizer.prompt_text(q, thinking=True)
    assert tok_i.decode(chat_tokens(tok_i, q)) == toy_tokenizer.prompt_text(q, thinking=False)


def test_instruct_is_short_thinking_is_long_and_accurate(pair, problems):
    cfg, params_i, params_t, tok_i, tok_t = pair
    inst = _run(params_i, cfg, tok_i, problems)
    think = _run(params_t, cfg, tok_t, problems)
    assert all(r.well_formed for r in inst + think)
    assert all(r.text.startswith("Answer: ") for r in inst)
    assert all("</think>\nAnswer: " in r.text for r in think)
    assert _accuracy(inst, 1) >= 0.9
    assert _accuracy(think, 6) >= _accuracy(inst, 6) + 0.3
    assert np.mean([r.num_tokens for r in think]) >= 3 * np.mean([r.num_tokens for r in inst])


def test_behaviour_lives_in_the_weights_not_the_template(pair, problems):
    """Swapped templates: the instruct model closes the opened think block at once; the thinking
    model opens one itself."""
    cfg, params_i, params_t, tok_i, tok_t = pair
    inst = _run(params_i, cfg, tok_t, problems)
    think = _run(params_t, cfg, tok_i, problems)
    assert all(r.well_formed and r.text.startswith("</think>\nAnswer: ") for r in inst)
    assert all(r.well_formed and r.text.startswith("<think>\nb=") for r in think)
    assert _accuracy(inst, 1) >= 0.9 and _accuracy(think, 6) >= _accuracy(inst, 6) + 0.3


def test_interpolated_midpoint_is_well_formed(pair, problems):
    cfg, params_i, params_t, tok_i, tok_t = pair
    mid = dj.interpolate(params_i, params_t, 0.5)
    for tok in (tok_t, tok_i):
        results = _run(mid, cfg, tok, problems)
        assert all(r.well_formed for r in results), [r.text for r in results if not r.well_formed][:5]
        assert _accuracy(results, 1) >= 0.5


def test_pair_loads_in_transformers(pair):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from dami_jax.models.model import forward

    cfg, params_i, _, tok_i, _ = pair
    model = AutoModelForCausalLM.from_pretrained(str(toy_pair_paths()[0]), dtype=torch.float32)
    ids = chat_tokens(tok_i, "a=12, b=a*3, c=b-7. c=?") + tok_i.encode("Answer: 29", add_special_tokens=False)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    ours = np.asarray(forward(params_i, cfg, np.asarray([ids], np.int32)))[0]
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=2e-4)


def test_diagnostic_sequences_mark_the_completion():
    for thinking in (False, True):
        tok = toy_tokenizer.build_tokenizer(thinking)
        seqs, masks = evaluation.diagnostic_sequences(tok, 2, seed=0, levels=(1, 3))
        assert len(seqs) == len(masks) == 4 and all(len(s) == len(m) for s, m in zip(seqs, masks))
        problem = task.toy_benchmark(2, seed=0, levels=(1, 3))[-1]
        reply = tok.decode([t for t, m in zip(seqs[-1], masks[-1]) if m])
        expected = task.thinking_response(problem) if thinking else task.instruct_response(problem)
        assert reply == expected + toy_tokenizer.IM_END
        assert tok.decode([t for t, m in zip(seqs[-1], masks[-1]) if not m]) == toy_tokenizer.prompt_text(problem.question, thinking)


def test_diagnostic_sequences_take_the_reference_trace():
    """Boxed style under a template that opens the think block: ``trace`` picks the reference
    (checked: System 2's steps then the check; worked, the default: the steps alone)."""
    tok = toy_tokenizer.build_tokenizer(True)
    problem = task.toy_benchmark(1, seed=0, levels=(3,))[0]
    replies = {}
    for trace in ("worked", "checked"):
        seqs, masks = evaluation.diagnostic_sequences(tok, 1, seed=0, levels=(3,), style="boxed", trace=trace)
        replies[trace] = tok.decode([t for t, m in zip(seqs[0], masks[0]) if m])
    thought = render("checked", toy_steps(problem)).text.split(THINK_CLOSE)[0]  # the toy vocabulary has no backslash
    assert replies["checked"].startswith(thought) and "Let me check each step." in thought
    assert replies["worked"].startswith(task.scratchpad(problem) + THINK_CLOSE) and "Check" not in replies["worked"]
    with pytest.raises(ValueError, match="unknown trace"):
        evaluation.diagnostic_sequences(tok, 1, style="boxed", trace="long")
    with pytest.raises(ValueError, match="boxed style"):
        evaluation.diagnostic_sequences(tok, 1, style="toy", trace="checked")
