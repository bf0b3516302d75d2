"""TailorKV against dense on a model whose attention is peaked on known far-back tokens
(``peaked.py``): links sit far back (outside every preset's sink and recent windows), so the
greedy continuation walks the cycle only if each layer retrieves the right token at every step:
exactly what TailorKV's quantized (layer 0) and sparse (layers 1, 2) layers must do to
reproduce dense.
"""

import dataclasses

import jax
import numpy as np
import pytest
from peaked import CFG, DEFAULT, LINKS_BEFORE_END, LINKS_FROM, linked_prompt, peaked_model, walk

import dami_jax as dj
from dami_jax.tailorkv import cache as tailorkv_cache
from dami_jax.tailorkv.cache import TAILORKV_1, TAILORKV_2, select_channels, token_scores

PARAMS = peaked_model()
# More than the quantized layer's 128-token residual: generated tokens get quantized mid-decode.
NEW_TOKENS = 136
# The default link span [LINKS_FROM, length - LINKS_BEFORE_END) of each row lies outside every
# preset's sink and recent windows, and past TailorKV-2's sink + top-k (64 + 896) slots, so that a
# retrieval whose scores carry no information (all tied, where lax.top_k takes the lowest slots) misses them.
# Two rows of different lengths (left padding, 2048 prefill slots), different cycles and starts:
# ((length, successor of each node, start node), seed).
ROWS = [((2000, [2, 0, 3, 1], 0), 1), ((1800, [3, 2, 1, 0], 1), 2)]


def prompts(links: bool = True) -> list[list[int]]:
    return [linked_prompt(*spec, seed=seed, links=links) for spec, seed in ROWS]


def run(cache, rows=None) -> dj.Generation:
    rows = prompts() if rows is None else rows
    return dj.generate(PARAMS, CFG, rows, max_new_tokens=NEW_TOKENS, stop_tokens=[], cache=cache)


@pytest.fixture(scope="module")
def dense() -> np.ndarray:
    return np.asarray(run(dj.DenseCacheConfig()).tokens)


def test_dense_walks_the_far_links_and_needs_them(dense):
    expected = [walk(successor, start, NEW_TOKENS) for (_, successor, start), _ in ROWS]
    np.testing.assert_array_equal(dense, expected)
    without_links = np.asarray(run(dj.DenseCacheConfig(), prompts(links=False)).tokens)
    np.testing.assert_array_equal(without_links, DEFAULT)


@pytest.mark.parametrize("preset", [TAILORKV_1, TAILORKV_2], ids=["TailorKV-1", "TailorKV-2"])
def test_presets_reproduce_dense_greedy_tokens(preset, dense):
    """The presets end to end for a batch: a 1- or 2-bit layer 0 and sparse layers 1 and 2 must
    each find every link at every step."""
    assert preset.quantized_layers == (0,)
    assert min(spec[0] for spec, _ in ROWS) > preset.budget
    assert LINKS_FROM >= preset.sink and LINKS_BEFORE_END > preset.recent
    out = run(preset)
    np.testing.assert_array_equal(out.tokens, dense)
    np.testing.assert_array_equal(out.lengths, NEW_TOKENS)
    assert np.all(np.isfinite(np.asarray(out.logprobs)))


# The failure tests use TailorKV-2, the hardest preset to break: under tied scores its 12 channels
# and 896 tokens contain TailorKV-1's 8 and 128.
BROKEN = TAILORKV_2


@pytest.fixture
def fresh_jit():
    """A monkeypatched selection must neither reuse nor leave behind programs traced with the real one."""
    jax.clear_caches()
    yield
    jax.clear_caches()


def lowest_scoring_channels(query, k_absmax, num_channels, head_mesh=None):
    """The channels select_channels ranks last (it returns them best first)."""
    return select_channels(query, k_absmax, k_absmax.shape[-1], head_mesh)[..., -num_channels:]


def negated_token_scores(q_channels, channel_rows, mode):
    return -token_scores(q_channels, channel_rows, mode)


@pytest.mark.usefixtures("fresh_jit")
@pytest.mark.parametrize(
    "name, wrong", [("select_channels", lowest_scoring_channels), ("token_scores", negated_token_scores)]
)
def test_wrong_channels_or_tokens_break_agreement(name, wrong, dense, monkeypatch):
    assert LINKS_FROM > BROKEN.sink + BROKEN.top_k
    monkeypatch.setattr(tailorkv_cache, name, wrong)
    out = np.asarray(run(BROKEN).tokens)
    np.testing.assert_array_equal(out[:, 0], dense[:, 0])  # the first token comes from the (dense) prefill
    assert np.all(out[:, 1:] != dense[:, 1:])


def test_windows_without_top_k_break_agreement(dense):
    windows_only = dataclasses.replace(BROKEN, budget=BROKEN.sink + BROKEN.recent)
    assert windows_only.top_k == 0
    out = np.asarray(run(windows_only).tokens)
    assert np.all(out[:, 1:] != dense[:, 1:])
