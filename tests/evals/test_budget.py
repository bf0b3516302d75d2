"""A tight-budget sweep seeded from a longer one equals the tight sweep run from scratch (toy pair:
its Instruct end answers in ~11 tokens, its Thinking end in ~47)."""

import json

import pytest

from dami_jax.errors import InputError
from dami_jax.evals.budget import seed_budget_sweep, within_budget
from dami_jax.evals.records import JsonlLog
from dami_jax.evals.sweep import RECORDS_FILE, SweepConfig, run_sweep
from dami_jax.toy.evaluation import toy_problems
from dami_jax.toy.pair import load_toy_pair

pytestmark = pytest.mark.xdist_group("toy_pair")

LONG = SweepConfig(lambdas=(0.0, 1.0), max_new_tokens=64, batch_size=6, style="toy", benchmark="toy")
TIGHT = 24


def _answers(records):
    return sorted(({k: v for k, v in r.items() if k != "wall_s"} for r in records), key=lambda r: (r["lambda"], r["id"]))


def test_within_budget_keeps_answers_that_ended_before_it():
    records = [{"truncated": False, "output_tokens": 11}, {"truncated": False, "output_tokens": 24},
               {"truncated": True, "output_tokens": 64}]  # fmt: skip
    assert within_budget(records, 24) == records[:1]
    assert within_budget(records, 25) == records[:2]


def test_seeded_sweep_equals_a_fresh_one(tmp_path):
    pair = load_toy_pair()
    problems = toy_problems(n_per_level=1)
    run_sweep(pair, problems, tmp_path / "long", LONG, progress=False)
    copied = seed_budget_sweep(tmp_path / "long", tmp_path / "seeded", TIGHT)
    assert 0 < copied < 2 * len(problems)  # Instruct's short answers carry over, Thinking's long ones do not
    tight = SweepConfig(**{**LONG.__dict__, "max_new_tokens": TIGHT})
    seeded = run_sweep(pair, problems, tmp_path / "seeded", tight, progress=False)
    fresh = run_sweep(pair, problems, tmp_path / "fresh", tight, progress=False)
    assert _answers(seeded) == _answers(fresh)
    assert json.loads((tmp_path / "seeded" / "settings.json").read_text())["max_new_tokens"] == TIGHT


def test_seeding_refuses_what_would_not_carry_over(tmp_path):
    pair = load_toy_pair()
    problems = toy_problems(n_per_level=1)[:2]
    run_sweep(pair, problems, tmp_path / "long", SweepConfig(**{**LONG.__dict__, "lambdas": (0.0,)}), progress=False)
    with pytest.raises(InputError, match="between 0 and"):
        seed_budget_sweep(tmp_path / "long", tmp_path / "more", 64)  # not a smaller budget
    seed_budget_sweep(tmp_path / "long", tmp_path / "seeded", TIGHT)
    with pytest.raises(InputError, match="already holds"):
        seed_budget_sweep(tmp_path / "long", tmp_path / "seeded", TIGHT)
    settings = tmp_path / "long" / "settings.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "sampling": {"temperature": 0.7, "top_k": None, "top_p": None}}))
    with pytest.raises(InputError, match="greedy"):
        seed_budget_sweep(tmp_path / "long", tmp_path / "sampled", TIGHT)
    assert len(JsonlLog(tmp_path / "seeded" / RECORDS_FILE).records) == 2
