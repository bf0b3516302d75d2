"""scripts/train_smollm2_thinking.py on a tiny random model with SmolLM2's tokenizer: a few steps,
the update file it writes merges to the fingerprint it records, an interrupted run resumes to the
same parameters as an uninterrupted one, and a run folder refuses other settings."""

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

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def script():
    spec = importlib.util.spec_from_file_location("train_smollm2_thinking", ROOT / "scripts" / "train_smollm2_thinking.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_base(smollm2_path, tmp_path_factory) -> Path:
    """A 2-layer random Llama with SmolLM2's vocabulary and tokenizer."""
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


def settings(train, base: Path, **kw):
    return train.Settings(fingerprint(load_checkpoint(base)[1]), rank=2, steps=4, batch=2, lr=1e-2, warmup=1, seed=0,
                          word_fraction=0.5, **kw)  # fmt: skip


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(train, tiny_base, tmp_path):
    s = settings(train, tiny_base)
    whole, stats, _, base = train.train(tiny_base, tmp_path / "whole", s, held_out=set())
    assert len(stats["losses"]) == 4 and stats["tokens"] > 0
    assert train.train(tiny_base, tmp_path / "cut", s, stop_after=2, held_out=set())[1]["losses"] == stats["losses"][:2]
    resumed, resumed_stats, _, _ = train.train(tiny_base, tmp_path / "cut", s, held_out=set())
    assert resumed_stats["losses"] == stats["losses"]
    assert fingerprint(merge_low_rank_exact(base, resumed)) == fingerprint(merge_low_rank_exact(base, whole))
    assert fingerprint(merge_low_rank_exact(base, whole)) != fingerprint(base)  # it learned something
    with pytest.raises(SystemExit, match="rank: 2 stored, 3 now"):
        train.train(tiny_base, tmp_path / "cut", dataclasses.replace(s, rank=3), held_out=set())


def test_the_command_writes_an_update_that_merges_to_its_recorded_fingerprint(train, tiny_base, tmp_path, capsys):
    out = tmp_path / "update"
    train.main(["--base", str(tiny_base), "--run", str(tmp_path / "run"), "--out", str(out), "--steps", "3", "--batch", "2", "--rank", "2"])
    update, meta = load_low_rank(out / "low_rank.safetensors")
    base = load_checkpoint(tiny_base)[1]
    assert meta["base"] == fingerprint(base) and meta["thinking"] == fingerprint(merge_low_rank_exact(base, update))
    summary = json.loads((out / "training.json").read_text())
    assert summary["steps"] == 3 and summary["rank"] == 2 and summary["thinking"] == meta["thinking"]
    assert summary["tokens_per_s"] > 0 and np.isfinite(summary["final_loss"])


def test_training_examples_are_the_evaluation_prompts_plus_a_worked_answer(train, tiny_base):
    tokenizer = load_tokenizer(tiny_base)
    tokenizer.chat_template = train.THINKING_TEMPLATE.read_text()
    batches = train.Batches(tokenizer, settings(train, tiny_base), held_out=set())
    tokens, mask, real = batches(0)
    rows = [batches.encode(*example)[0] for example in itertools.islice(train.examples(0, 0.5), 2)]  # seed 0, step 0
    assert tokens.shape == (2, -(-max(map(len, rows)) // train.BUCKET) * train.BUCKET) and real == sum(map(len, rows))
    assert [tokens[i, : len(row)].tolist() for i, row in enumerate(rows)] == rows
    text = tokenizer.decode(tokens[0][mask[0] > 0])
    assert "</think>\nThe answer is \\boxed{" in text and text.endswith("}.<|im_end|>")
    prompt = tokenizer.decode(tokens[0][: int(np.argmax(mask[0]))])
    assert prompt.endswith("<|im_start|>assistant\n<think>\n") and "put your final answer within \\boxed{}" in prompt
    with pytest.raises(AssertionError, match="a held-out question was drawn"):
        train.Batches(tokenizer, settings(train, tiny_base), held_out={train.question_hash("a=1, b=a+1. b=?")}).encode("a=1, b=a+1. b=?", "", 2)


def test_the_defaults_are_the_shipped_updates_settings(train):
    """Running the script without options reproduces the shipped update: its defaults are the
    settings training.json records."""
    shipped = json.loads((ROOT / "dami_jax" / "models" / "smollm2-thinking" / "training.json").read_text())
    defaults = train.arguments().parse_args([])
    assert {k: getattr(defaults, k) for k in ("rank", "steps", "batch", "lr", "warmup", "seed", "word_fraction")} == {
        k: shipped[k] for k in ("rank", "steps", "batch", "lr", "warmup", "seed", "word_fraction")
    }
