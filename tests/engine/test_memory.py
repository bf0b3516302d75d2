"""Slots and tokens per slot from the free memory: what is picked, and what is refused."""

from __future__ import annotations

import pytest

import dami_jax as dj
from dami_jax.engine.cache import RowLayout
from dami_jax.engine.engine import Engine
from dami_jax.engine.memory import KV_SHARE, MIN_CONTEXT, free_memory, kv_bytes_per_token, size_engine
from dami_jax.errors import InputError
from dami_jax.models.config import ModelConfig

CFG = ModelConfig(architecture="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=4, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=32768)  # fmt: skip
PER_TOKEN = kv_bytes_per_token(CFG, 4)  # 2 * 4 layers * 2 heads * 16 * 4 bytes = 1 KiB


def free(gb: float) -> tuple[int, str]:
    return int(gb * 2**30), "test memory"


def test_what_fits_is_picked_up_to_the_models_context():
    assert PER_TOKEN == 1024
    plenty = size_engine(CFG, 4, 0, None, None, free=free(8))
    assert (plenty.slots, plenty.max_len) == (8, 32768)  # 8 x 32768 x 1 KiB = 256 MiB fits
    tight = size_engine(CFG, 4, 0, None, None, free=free(0.1))  # 80% of 100 MiB: 10 MiB per slot
    assert tight.slots == 8 and tight.max_len == RowLayout().longest_within(int(KV_SHARE * 0.1 * 2**30) // 8 // PER_TOKEN)
    assert tight.kv_bytes <= tight.budget
    assert "8 slots x" in tight.describe() and "test memory" in tight.describe()


def test_slots_halve_until_a_row_holds_the_minimum_context():
    sizing = size_engine(CFG, 4, 0, None, None, free=free(MIN_CONTEXT * PER_TOKEN * 3 / KV_SHARE / 2**30))
    assert sizing.slots == 2 and sizing.max_len >= MIN_CONTEXT


def test_given_max_len_picks_the_slots_and_thetas_come_off_first():
    assert size_engine(CFG, 4, 0, None, 4096, free=free(8)).slots == 8
    assert size_engine(CFG, 4, 0, None, 4096, free=free(0.01)).slots == 2  # 8 MiB: two rows of 4 MiB
    with pytest.raises(InputError, match=r"slots=8 x max_len=32768: the KV cache needs 0\.27 GB .* lower max_len or slots"):
        size_engine(CFG, 4, int(7.9 * 2**30), 8, 32768, free=free(8))  # the thetas leave ~100 MB


def test_a_configuration_that_cannot_fit_is_refused_with_its_numbers():
    with pytest.raises(InputError, match=r"slots=64 x max_len=32768: the KV cache needs 2\.15 GB \(0\.03 GB per slot\), "
                                         r"more than the 0\.86 GB it may take \(80% of the 1\.07 GB of test memory free"):
        size_engine(CFG, 4, 0, 64, 32768, free=free(1))


def test_the_engine_says_what_it_picked_and_refuses_before_allocating():
    pair = dj.load_toy_pair()
    engine = Engine(pair, slots=2)
    assert engine.context == pair.cfg.max_position_embeddings  # the toy model's 512 fit easily
    assert engine.sizing.slots == 2 and "2 slots x 512 tokens" in engine.sizing.describe()
    available, _ = free_memory()
    with pytest.raises(InputError, match="lower max_len or slots"):
        Engine(pair, slots=available // (kv_bytes_per_token(pair.cfg, 4) * 512) + 1, max_len=512)
