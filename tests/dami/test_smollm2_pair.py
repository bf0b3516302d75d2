"""The SmolLM2 pair: the shipped Thinking update is the pinned file, merging it reproduces the cached
Thinking checkpoint, the endpoints are exact, and a stale cached folder is rebuilt, never used.

Real weights: these skip without the carrier package on a developer's machine and fail under CI
(the ``smollm2_path`` fixture)."""

from __future__ import annotations

import shutil

import pytest

import dami_jax as dj
from dami_jax.evals.prompts import prompt_text, template_opens_think
from dami_jax.models.assets import sha256
from dami_jax.models.checkpoint import load_checkpoint, save_hf_checkpoint
from dami_jax.models.low_rank import load_low_rank, merge_low_rank_exact
from dami_jax.models.pinned import (
    SMOLLM2_NAME, THINKING_UPDATE, THINKING_UPDATE_SHA256, smollm2_folder, smollm2_thinking_checkpoint,
)  # fmt: skip
from dami_jax.models.params import fingerprint

pytestmark = pytest.mark.xdist_group("smollm2")


@pytest.fixture(scope="module")
def pair(smollm2_path):
    return dj.load_pair("smollm2")


def test_the_shipped_update_is_the_pinned_file_and_small():
    assert sha256(THINKING_UPDATE) == THINKING_UPDATE_SHA256
    assert THINKING_UPDATE.stat().st_size <= 12_000_000


def test_merging_the_update_reproduces_the_cached_thinking_checkpoint(pair):
    update, meta = load_low_rank(THINKING_UPDATE)
    assert meta["base"] == fingerprint(pair.instruct)
    assert fingerprint(merge_low_rank_exact(pair.instruct, update)) == meta["thinking"] == fingerprint(pair.thinking)
    assert pair.paths["thinking"] == str(smollm2_thinking_checkpoint())


def test_the_endpoints_are_exact(pair, smollm2_path):
    assert fingerprint(load_checkpoint(smollm2_path)[1]) == fingerprint(pair.instruct)  # lambda 0 is SmolLM2-Instruct
    assert fingerprint(dj.interpolate(pair.instruct, pair.thinking, 0.0)) == fingerprint(pair.instruct)
    assert fingerprint(dj.interpolate(pair.instruct, pair.thinking, 1.0)) == fingerprint(pair.thinking)


def test_only_the_thinking_template_opens_the_think_block(pair):
    assert template_opens_think(pair.tokenizers["thinking"]) and not template_opens_think(pair.tokenizers["instruct"])
    assert prompt_text(pair.tokenizers["thinking"], "2+2?").endswith("<|im_start|>assistant\n<think>\n")
    assert pair.tokenizers["thinking"].get_vocab() == pair.tokenizers["instruct"].get_vocab()


def test_a_cached_folder_with_other_weights_is_rebuilt(smollm2_path, tmp_path, monkeypatch):
    """In a cache of its own: Instruct linked in, Thinking merged, then overwritten with Instruct's
    weights (a stale or damaged folder); the next call notices and merges again."""
    monkeypatch.setenv("DAMI_JAX_CACHE", str(tmp_path))
    smollm2_folder().parent.mkdir(parents=True)
    smollm2_folder().symlink_to(smollm2_path, target_is_directory=True)
    folder = smollm2_thinking_checkpoint()
    assert folder.parent == smollm2_folder().parent and folder.name.startswith("SmolLM2-135M-Thinking-")
    cfg, instruct = load_checkpoint(smollm2_path)
    save_hf_checkpoint(folder, cfg, instruct)
    assert smollm2_thinking_checkpoint() == folder
    assert fingerprint(load_checkpoint(folder)[1]) == load_low_rank(THINKING_UPDATE)[1]["thinking"]
    shutil.rmtree(folder)
    assert SMOLLM2_NAME in str(smollm2_folder())


def test_a_pair_name_must_be_a_pinned_pair():
    with pytest.raises(dj.InputError, match=r"give a Thinking folder beside nope, or name a pinned pair \(smollm2\)"):
        dj.load_pair("nope")
