"""Lambda sweeps: resumable JSONL records, table, frontier, on a tiny random pair with the toy tokenizer."""

import json

import jax
import pytest

import dami_jax as dj
import dami_jax.sweep as sweep_module
from dami_jax.benchmarks import toy_problems
from dami_jax.config import ModelConfig
from dami_jax.frontier import SweepPoint, format_table, frontier_shape, pareto_frontier, plot_frontier, summarize
from dami_jax.pair import load_pair
from dami_jax.records import JsonlLog
from dami_jax.sweep import SweepConfig, run_sweep
from dami_jax.toy import build_tokenizer, vocabulary


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    vocab = vocabulary()
    cfg = ModelConfig(architecture="qwen3", vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=256,
                      eos_token_ids=(vocab["<|im_end|>"],), pad_token_id=vocab["<|endoftext|>"])  # fmt: skip
    paths = []
    for seed, thinking in ((0, False), (1, True)):
        path = tmp_path_factory.mktemp("thinking" if thinking else "instruct")
        dj.save_hf_checkpoint(path, cfg, dj.init_params(cfg, jax.random.key(seed), scale=0.3))
        build_tokenizer(thinking).save_pretrained(path)
        paths.append(path)
    return load_pair(*paths)


CONFIG = SweepConfig(lambdas=(0.0, 0.5, 1.0), max_new_tokens=10, batch_size=4, style="toy")


def test_interrupted_sweep_resumes_without_redoing_work(tiny_pair, tmp_path, monkeypatch):
    problems = toy_problems(n_per_level=1)  # 6 problems: two batches per lambda
    reference = run_sweep(tiny_pair, problems, tmp_path / "reference.jsonl", CONFIG)
    assert len(reference) == 18

    calls = []
    real = sweep_module.answer_batch

    def crash_on_third_batch(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    log = tmp_path / "resumed.jsonl"
    monkeypatch.setattr(sweep_module, "answer_batch", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tiny_pair, problems, log, CONFIG)
    with open(log, "a") as f:
        f.write('{"lambda": 0.5, "id": "half-writ')  # a record cut off by the crash
    assert len(JsonlLog(log).records) == 6  # two batches done; the partial line is dropped

    redone = []
    monkeypatch.setattr(sweep_module, "answer_batch", lambda *a, **k: redone.extend(a[2]) or real(*a, **k))
    resumed = run_sweep(tiny_pair, problems, log, CONFIG)
    assert len(redone) == 12  # only the unfinished (lambda, problem) pairs
    key = lambda r: (r["lambda"], r["id"])  # noqa: E731
    assert sorted(resumed, key=key) == sorted(reference, key=key)
    assert all(json.loads(line) for line in log.read_text().splitlines())
    assert run_sweep(tiny_pair, problems, log, CONFIG) == resumed  # nothing left to do


def test_records_table_and_frontier(tiny_pair, tmp_path):
    records = run_sweep(tiny_pair, toy_problems(n_per_level=1)[:2], tmp_path / "r.jsonl", CONFIG)
    for r in records:
        assert set(r) >= {"lambda", "id", "response", "correct", "output_tokens", "think_opened", "think_closed", "thought_chars"}
        assert 1 <= r["output_tokens"] <= CONFIG.max_new_tokens
        assert r["think_opened"]  # the thinking template opens the block at every lambda
    points = summarize(records)
    assert [p.lam for p in points] == [0.0, 0.5, 1.0]
    assert "lambda" in format_table(points)
    assert plot_frontier(points, tmp_path / "f.png").stat().st_size > 0


def test_frontier_shape_is_measured_not_assumed():
    pts = [SweepPoint(0.0, 0.3, 5, 0, 10), SweepPoint(0.5, 0.6, 20, 0.5, 10), SweepPoint(1.0, 0.7, 60, 1, 10)]
    assert [p.lam for p in pareto_frontier(pts)] == [0.0, 0.5, 1.0]
    assert frontier_shape(pts) == {"monotonic_in_lambda": True, "convex_frontier": True}
    dented = [SweepPoint(0.0, 0.3, 5, 0, 10), SweepPoint(0.5, 0.35, 50, 0.5, 10), SweepPoint(1.0, 0.7, 60, 1, 10)]
    assert frontier_shape(dented)["convex_frontier"] is False
    falling = [SweepPoint(0.0, 0.5, 5, 0, 10), SweepPoint(1.0, 0.4, 60, 1, 10)]
    assert frontier_shape(falling)["monotonic_in_lambda"] is False


def test_crowded_points_are_labelled_once_frontier_first():
    from dami_jax.frontier import _labelled

    # lambdas 0.6..1.0 sit on top of each other at the thinking end; 0.9 is the frontier's best
    pts = [SweepPoint(0.0, 0.3, 13, 0, 60), SweepPoint(0.4, 0.75, 40, 0.6, 60)]
    pts += [SweepPoint(lam, acc, 47.2, 1, 60) for lam, acc in ((0.6, 0.967), (0.7, 0.967), (0.8, 0.983), (0.9, 1.0), (1.0, 1.0))]
    labelled = [p.lam for p in _labelled(pts, pareto_frontier(pts))]
    assert labelled == [0.0, 0.4, 0.9]


def test_bad_sweep_config():
    with pytest.raises(ValueError, match="template"):
        SweepConfig(template="both")
    with pytest.raises(ValueError, match="lambdas"):
        SweepConfig(lambdas=())
