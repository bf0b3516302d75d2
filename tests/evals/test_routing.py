"""Router data and the whole DAMI pipeline on tiny random Qwen3 and Qwen3-MoE pairs (plumbing:
the real-pair path, sweep -> train-router -> route-eval with both routers, through the command
line)."""

import json

import pytest
from conftest import write_tiny_pair

from dami_jax import cli
from dami_jax.errors import InputError
from dami_jax.evals.benchmarks import Problem
from dami_jax.evals.records import JsonlLog
from dami_jax.evals.router_data import mix_problems, read_sweeps, router_split, validation_split

pytestmark = pytest.mark.xdist_group("toy_pair")

SWEEP = ["sweep", "--n-per-level", "3", "--lambdas", "0,0.5,1", "--max-new-tokens", "6", "--batch-size", "18", "--style", "toy"]


@pytest.fixture(scope="module")
def pair_paths(tmp_path_factory):
    return [str(p) for p in write_tiny_pair(tmp_path_factory)]


@pytest.fixture(scope="module")
def swept(pair_paths, tmp_path_factory):
    return marked_sweep(pair_paths, tmp_path_factory.mktemp("sweep"))


def marked_sweep(pair_paths, out):
    """A sweep of the random pair in which, so that preference pairs exist, the Thinking end is
    marked correct on every problem and the Instruct end on every other one (random models
    answer nothing right; this tests plumbing, not learning)."""
    assert cli.main([*SWEEP, "--instruct", pair_paths[0], "--thinking", pair_paths[1], "--out", str(out)]) == 0
    log = out / "records.jsonl"
    records = JsonlLog(log).records
    ids = sorted({r["id"] for r in records})
    for r in records:
        r["correct"] = r["lambda"] == 1.0 or (r["lambda"] == 0.0 and ids.index(r["id"]) % 2 == 0)
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def test_read_sweeps_pools_folders_and_checks_them(swept, tmp_path):
    data = read_sweeps([swept])
    assert data.grid == (0.0, 0.5, 1.0) and len(data.problems) == 18
    assert all(len(r) == 3 for r in data.rollouts.values()) and data.settings["style"] == "toy"
    assert read_sweeps([swept, swept]).digest == data.digest  # the same records pooled twice: the same data
    other = tmp_path / "other"
    other.mkdir()
    settings = json.loads((swept / "settings.json").read_text())
    (other / "settings.json").write_text(json.dumps({**settings, "max_new_tokens": 7}))
    (other / "records.jsonl").write_text("")
    with pytest.raises(InputError, match="max_new_tokens=7"):
        read_sweeps([swept, other])
    (other / "settings.json").write_text(json.dumps(settings))
    old = [{k: v for k, v in r.items() if k != "question"} for r in JsonlLog(swept / "records.jsonl").records[:1]]
    (other / "records.jsonl").write_text(json.dumps(old[0]) + "\n")
    with pytest.raises(InputError, match="records.jsonl:1: no question text"):
        read_sweeps([other])
    with pytest.raises(InputError, match="not a sweep folder"):
        read_sweeps([tmp_path])
    (other / "records.process1.jsonl").write_text(json.dumps(old[0]) + "\n")  # a split sweep's share, not merged
    with pytest.raises(InputError, match="records.process1.jsonl: a split sweep did not finish here"):
        read_sweeps([other])


def test_splits_and_mixes():
    problems = [Problem(f"toy-{level}-{i}", f"q{level}.{i}", "1", f"toy-{level}") for level in range(1, 7) for i in range(300)]
    train, evaluation = router_split([p.id for p in problems])
    fit, val = validation_split(train)
    assert set(train).isdisjoint(evaluation) and set(fit) | set(val) == set(train) and set(fit).isdisjoint(val)
    held_out = [p for p in problems if p.id in set(evaluation)]
    mixed = mix_problems(held_out, "easy-heavy", 300)
    levels = [int(p.source[-1]) for p in mixed]
    assert len(mixed) == 300 and [levels.count(k) for k in range(1, 7)] == [120, 60, 30, 30, 30, 30]
    assert [levels.count(k) for k in range(1, 7)] != [50] * 6
    assert [int(p.source[-1]) for p in mix_problems(held_out, "uniform", 60)].count(3) == 10
    with pytest.raises(InputError, match="needs 400 level-1 problems; the evaluation side has"):
        mix_problems(held_out, "easy-heavy", 1000)
    with pytest.raises(InputError, match="no difficulty level"):
        mix_problems([Problem("g1", "q", "1", "gsm8k")], "uniform", 6)


def test_the_pipeline_runs_on_a_real_pair_layout(capsys, pair_paths, swept, tmp_path):
    run_pipeline(pair_paths, swept, tmp_path)
    capsys.readouterr()


def test_the_pipeline_runs_on_a_mixture_of_experts_pair(capsys, tmp_path_factory, tmp_path):
    paths = [str(p) for p in write_tiny_pair(tmp_path_factory, moe=True)]
    run_pipeline(paths, marked_sweep(paths, tmp_path / "sweep"), tmp_path)
    capsys.readouterr()


def run_pipeline(pair_paths, swept, tmp_path):
    """train-router on ``swept``, then route-eval with both routers against every fixed lambda."""
    pair = ["--instruct", pair_paths[0], "--thinking", pair_paths[1]]
    router = tmp_path / "router"
    assert cli.main(["train-router", "--records", str(swept), *pair, "--epochs", "3", "--out", str(router)]) == 0
    out = tmp_path / "eval"
    argv = ["route-eval", *SWEEP[1:], *pair, "--router", str(router), "--router", "conf", "--max-draft-tokens", "4",
            "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    methods = [entry["method"] for entry in json.loads((out / "summary.json").read_text())]
    assert methods == ["instruct", "fixed-0.5", "thinking", "oracle", "dami-pref", "dami-conf"]
    tests = json.loads((out / "paired.json").read_text())  # each method against Thinking, on the same problems
    assert [t["method"] for t in tests] == ["instruct", "fixed-0.5", "oracle", "dami-pref", "dami-conf"]
    assert {t["reference"] for t in tests} == {"thinking"} and len({t["n"] for t in tests}) == 1
    oracle = next(t for t in tests if t["method"] == "oracle")
    assert oracle["only_reference"] == 0  # the oracle is right wherever Thinking is
    routed = JsonlLog(out / "routed.jsonl").records
    assert {r["method"] for r in routed} == {"dami-pref", "dami-conf"}
    conf = [r for r in routed if r["method"] == "dami-conf"]
    assert all(r["output_tokens"] == r.get("served_tokens", 0) + r["draft_tokens"] for r in conf)  # drafts are paid for
