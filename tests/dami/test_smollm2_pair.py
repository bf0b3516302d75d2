"""The pinned SmolLM2 pairs: each shipped update is its pinned file, merging it reproduces its cached
checkpoint, both endpoints of each pair are exactly those checkpoints, the templates open the think
block where they should, and a stale cached folder is rebuilt, never used.

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
from dami_jax.models.pinned import PINNED_PAIRS, SMOLLM2_NAME, SYSTEM1, SYSTEM2, THINKING, smollm2_folder
from dami_jax.models.params import fingerprint

pytestmark = pytest.mark.xdist_group("smollm2")
UPDATES = {"thinking": THINKING, "system1": SYSTEM1, "system2": SYSTEM2}
# Each pinned pair's endpoints: the pinned update merged at each end (None: stock Instruct).
ENDPOINTS = {"smollm2": (None, THINKING), "smollm2-systems": (SYSTEM1, SYSTEM2)}


@pytest.fixture(scope="module", params=list(ENDPOINTS))
def pair(request, smollm2_path):
    return request.param, dj.load_pair(request.param)


def test_every_pinned_pair_is_tested():
    assert set(ENDPOINTS) == set(PINNED_PAIRS)


@pytest.mark.parametrize("update", UPDATES.values(), ids=list(UPDATES))
def test_each_shipped_update_is_its_pinned_file_and_small(update):
    assert sha256(update.file) == update.sha256
    assert update.file.stat().st_size <= 12_000_000
    assert (update.folder / "training.json").is_file()


@pytest.mark.parametrize("update", UPDATES.values(), ids=list(UPDATES))
def test_merging_each_update_reproduces_its_cached_checkpoint(update, smollm2_path):
    delta, meta = load_low_rank(update.file)
    instruct = load_checkpoint(smollm2_path)[1]
    assert meta["base"] == fingerprint(instruct)
    merged = fingerprint(merge_low_rank_exact(instruct, delta))
    assert merged == meta["merged"] == fingerprint(load_checkpoint(update.checkpoint())[1])
    assert merged != fingerprint(instruct)


def test_both_endpoints_are_exactly_the_merged_models(pair, smollm2_path):
    name, loaded = pair
    want = [fingerprint(load_checkpoint(smollm2_path)[1]) if u is None else load_low_rank(u.file)[1]["merged"]
            for u in ENDPOINTS[name]]  # fmt: skip
    assert [fingerprint(loaded.instruct), fingerprint(loaded.thinking)] == want
    assert fingerprint(dj.interpolate(loaded.instruct, loaded.thinking, 0.0)) == want[0]
    assert fingerprint(dj.interpolate(loaded.instruct, loaded.thinking, 1.0)) == want[1]


def test_only_the_thinking_end_opens_the_think_block(pair):
    _, loaded = pair
    tokenizers = loaded.tokenizers
    assert template_opens_think(tokenizers["thinking"]) and not template_opens_think(tokenizers["instruct"])
    assert prompt_text(tokenizers["thinking"], "2+2?").endswith("<|im_start|>assistant\n<think>\n")
    assert prompt_text(tokenizers["instruct"], "2+2?").endswith("<|im_start|>assistant\n")
    assert tokenizers["thinking"].get_vocab() == tokenizers["instruct"].get_vocab()


def test_a_cached_folder_with_other_weights_is_rebuilt(smollm2_path, tmp_path, monkeypatch):
    """In a cache of its own: Instruct linked in, System 2 merged, then overwritten with Instruct's
    weights (a stale or damaged folder); the next call notices and merges again."""
    monkeypatch.setenv("DAMI_JAX_CACHE", str(tmp_path))
    smollm2_folder().parent.mkdir(parents=True)
    smollm2_folder().symlink_to(smollm2_path, target_is_directory=True)
    folder = SYSTEM2.checkpoint()
    assert folder.parent == smollm2_folder().parent and folder.name.startswith("SmolLM2-135M-System2-")
    cfg, instruct = load_checkpoint(smollm2_path)
    save_hf_checkpoint(folder, cfg, instruct)
    assert SYSTEM2.checkpoint() == folder
    assert fingerprint(load_checkpoint(folder)[1]) == load_low_rank(SYSTEM2.file)[1]["merged"]
    assert (folder / "chat_template.jinja").read_text() == SYSTEM2.template.read_text()
    shutil.rmtree(folder)
    assert SMOLLM2_NAME in str(smollm2_folder())


def test_a_pair_name_must_be_a_pinned_pair():
    with pytest.raises(dj.InputError, match=r"give a Thinking folder beside nope, or name a pinned pair \(smollm2, smollm2-systems\)"):
        dj.load_pair("nope")
