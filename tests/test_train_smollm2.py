"""scripts/train_smollm2.py on a tiny random model with SmolLM2's tokenizer: a few steps, the update
files it writes merge to the fingerprints they record, an interrupted run resumes to the same
parameters as an uninterrupted one, a run folder refuses other settings, each update's examples
are the evaluation prompts through its own template plus its trace style (a slip's wrong value
untrained), and the defaults are the shipped updates' settings."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from dami_jax.models.checkpoint import load_checkpoint, save_hf_checkpoint
from dami_jax.models.config import ModelConfig
from dami_jax.models.low_rank import load_low_rank, merge_low_rank_exact
from dami_jax.models.params import fingerprint, init_params
from dami_jax.models.tokenizer import load_tokenizer
from dami_jax.toy.steps import work

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def script():
    spec = importlib.util.spec_from_file_location("train_smollm2", ROOT / "scripts" / "train_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_base(smollm2_path, tmp_path_factory) -> Path:
    """A 2-layer random Llama with SmolLM2's vocabulary, tokenizer and (Instruct's) chat template."""
    cfg = ModelConfig(architecture="llama", vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, tie_word_embeddings=True, max_position_embeddings=512,
                      eos_token_ids=(2,), pad_token_id=2)  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny-smollm2")
    save_hf_checkpoint(folder, cfg, init_params(cfg, jax.random.key(0)))
    for name in TOKENIZER_FILES:
        shutil.copy(smollm2_path / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def train():
    return script()


def settings(train, base: Path, recipe: str = "system2", **kw):
    chosen = dict(rank=2, steps=4, batch=2, lr=1e-2, warmup=1, seed=0, word_fraction=0.5, slip_rate=0.0) | kw
    return train.Settings(fingerprint(load_checkpoint(base)[1]), train.RECIPES[recipe].style, **chosen)


def tokenizer_for(train, base: Path, recipe: str):
    tokenizer = load_tokenizer(base)
    if (template := train.RECIPES[recipe].pinned.template) is not None:
        tokenizer.chat_template = template.read_text()
    return tokenizer


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(train, tiny_base, tmp_path):
    s, template = settings(train, tiny_base, slip_rate=0.5), train.RECIPES["system2"].pinned.template
    whole, stats, _, base = train.train(tiny_base, tmp_path / "whole", s, template, held_out=set())
    assert len(stats["losses"]) == len(stats["step_seconds"]) == 4 and stats["tokens"] > 0
    cut = train.train(tiny_base, tmp_path / "cut", s, template, stop_after=2, held_out=set())[1]
    assert cut["losses"] == stats["losses"][:2]
    resumed, resumed_stats, _, _ = train.train(tiny_base, tmp_path / "cut", s, template, held_out=set())
    assert resumed_stats["losses"] == stats["losses"] and resumed_stats["trained_tokens"] == stats["trained_tokens"]
    assert fingerprint(merge_low_rank_exact(base, resumed)) == fingerprint(merge_low_rank_exact(base, whole))
    assert fingerprint(merge_low_rank_exact(base, whole)) != fingerprint(base)  # it learned something
    with pytest.raises(SystemExit, match="rank: 2 stored, 3 now"):
        train.train(tiny_base, tmp_path / "cut", dataclasses.replace(s, rank=3), template, held_out=set())


def test_the_command_writes_each_update_merging_to_its_recorded_fingerprint(train, tiny_base, tmp_path):
    out = tmp_path / "updates"
    train.main(["system1", "system2", "--base", str(tiny_base), "--runs", str(tmp_path / "runs"), "--out", str(out),
                "--steps", "3", "--batch", "2", "--rank", "2", "--warmup", "1"])  # fmt: skip
    base = load_checkpoint(tiny_base)[1]
    merged = set()
    for name in ("system1", "system2"):
        update, meta = load_low_rank(out / name / "low_rank.safetensors")
        assert meta["base"] == fingerprint(base) and meta["merged"] == fingerprint(merge_low_rank_exact(base, update))
        summary = json.loads((out / name / "training.json").read_text())
        assert summary["steps_done"] == summary["steps"] == 3 and summary["rank"] == 2 and summary["merged"] == meta["merged"]
        assert summary["style"] == train.RECIPES[name].style and summary["slip_rate"] == train.RECIPES[name].defaults["slip_rate"]
        assert summary["tokens_per_s"] > 0 and np.isfinite(summary["final_loss"])
        merged.add(meta["merged"])
    assert len(merged) == 2
    s1, s2 = (json.loads((out / n / "training.json").read_text())["mean_trained_tokens_per_sequence"] for n in ("system1", "system2"))
    assert s2 > 3 * s1  # System 2 deliberates; System 1 answers at once


def test_a_run_stopped_early_is_exported_only_when_asked(train, tiny_base, tmp_path, capsys):
    args = ["system1", "--base", str(tiny_base), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
            "--steps", "3", "--batch", "2", "--rank", "2", "--stop-after", "1"]  # fmt: skip
    train.main(args)
    assert "system1: stopped at step 1 of 3" in capsys.readouterr().err and not (tmp_path / "out").exists()
    train.main([*args, "--export-unfinished"])
    assert json.loads((tmp_path / "out" / "system1" / "training.json").read_text())["steps_done"] == 1


@pytest.mark.parametrize("recipe", ["system1", "system2", "thinking"])
def test_examples_are_the_evaluation_prompts_through_the_updates_template_plus_its_trace(train, tiny_base, recipe):
    tokenizer = tokenizer_for(train, tiny_base, recipe)
    batches = train.Batches(tokenizer, settings(train, tiny_base, recipe), held_out=set())
    tokens, mask, real = batches(0)
    rows = [batches.encode(*example)[0] for example in itertools.islice(train.examples(0, 0.5), 2)]  # seed 0, step 0
    assert tokens.shape == (2, -(-max(map(len, rows)) // train.BUCKET) * train.BUCKET) and real == sum(map(len, rows))
    assert [tokens[i, : len(row)].tolist() for i, row in enumerate(rows)] == rows
    text = tokenizer.decode(tokens[0][mask[0] > 0])
    prompt = tokenizer.decode(tokens[0][: int(np.argmax(mask[0]))])
    assert "put your final answer within \\boxed{}" in prompt and text.endswith("}.<|im_end|>")
    if recipe == "system1":
        assert prompt.endswith("<|im_start|>assistant\n") and text.count("\n") == 1 and "\nThe answer is \\boxed{" in text
    else:
        assert prompt.endswith("<|im_start|>assistant\n<think>\n") and "</think>\nThe answer is \\boxed{" in text
    assert ("Let me check each step." in text) == (recipe == "system2")


def test_a_slips_wrong_value_is_not_trained_and_held_out_questions_are_refused(train, tiny_base):
    tokenizer = tokenizer_for(train, tiny_base, "system2")
    batches = train.Batches(tokenizer, settings(train, tiny_base), held_out=set())
    question, steps = next(train.examples(0, 0.0))  # a toy chain
    wrong = work(steps).values[0] + 10
    ids, counted = batches.encode(question, steps, (0, wrong))
    prompt_length = counted.index(1.0)
    untrained = [t for t, c in zip(ids[prompt_length:], counted[prompt_length:]) if not c]
    assert tokenizer.decode(untrained) == str(wrong)  # the slip's digits, and nothing else
    trained = tokenizer.decode([t for t, c in zip(ids, counted) if c])
    assert f"not {wrong}. Corrected." in trained  # the slip is caught and fixed in the check
    with pytest.raises(AssertionError, match="a held-out question was drawn"):
        train.Batches(tokenizer, settings(train, tiny_base), held_out={train.question_hash(question)}).encode(question, steps)


def test_the_defaults_are_the_shipped_updates_settings(train):
    """Running the script without options reproduces the shipped updates: each recipe's defaults
    are the settings its training.json records."""
    assert train.arguments().parse_args([]).updates == [] and train.PAIR == ("system1", "system2")
    for name, recipe in train.RECIPES.items():
        shipped = json.loads((recipe.pinned.folder / "training.json").read_text())
        assert {k: shipped[k] for k in train.SETTINGS_ARGS} == recipe.defaults and shipped["style"] == recipe.style, name
