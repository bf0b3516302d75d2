"""Lambda sweeps: resumable records that are never stale, per-record keys, table, frontier, on a
tiny random pair with the toy tokenizer."""

import dataclasses

import pytest
from matplotlib.image import imread
from conftest import interrupted_on_call, write_tiny_pair

import dami_jax.evals.sweep as sweep_module
from dami_jax.dami.interpolation import interpolate
from dami_jax.dami.pair import load_pair
from dami_jax.decoding.sampling import Sampling
from dami_jax.evals.answering import answer
from dami_jax.evals.benchmarks import Problem
from dami_jax.evals.frontier import SweepPoint, format_table, frontier_shape, pareto_frontier, sweep_points
from dami_jax.evals.plots import frontier_labels, plot_frontier, plot_frontier_panels
from dami_jax.evals.records import JsonlLog, StaleResultsError, part_path, part_paths
from dami_jax.evals.sweep import RECORDS_FILE, SweepConfig, record_keys, run_sweep
from dami_jax.toy.evaluation import toy_problems
from dami_jax.toy.pair import load_toy_pair


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    return load_pair(*write_tiny_pair(tmp_path_factory))


CONFIG = SweepConfig(lambdas=(0.0, 0.5, 1.0), max_new_tokens=10, batch_size=4, style="toy")


def _by_key(records):
    """Records in (lambda, id) order, without their wall times (which differ from run to run)."""
    return sorted(({k: v for k, v in r.items() if k != "wall_s"} for r in records), key=lambda r: (r["lambda"], r["id"]))


def test_interrupted_sweep_resumes_without_redoing_work(tiny_pair, tmp_path, monkeypatch):
    problems = toy_problems(n_per_level=1)  # 6 problems through 4 slots, at each of 3 lambdas
    reference = run_sweep(tiny_pair, problems, tmp_path / "reference", CONFIG)
    assert len(reference) == 18

    real = sweep_module.answer_on_engine
    out = tmp_path / "resumed"
    monkeypatch.setattr(sweep_module, "answer_on_engine", interrupted_on_call(real, 2))  # Ctrl-C as lambda 0.5 starts
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tiny_pair, problems, out, CONFIG)
    log = out / RECORDS_FILE
    with open(log, "a") as f:
        f.write('{"lambda": 0.5, "id": "half-writ')  # a record cut off by the crash
    assert len(JsonlLog(log).records) == 6  # lambda 0 done; the torn last line is dropped

    redone = []
    monkeypatch.setattr(sweep_module, "answer_on_engine", lambda *a, **k: redone.extend(a[2]) or real(*a, **k))
    resumed = run_sweep(tiny_pair, problems, out, CONFIG)
    assert len(redone) == 12  # only the unfinished (lambda, problem) pairs
    assert _by_key(resumed) == _by_key(reference)
    assert run_sweep(tiny_pair, problems, out, CONFIG) == resumed and len(redone) == 12  # nothing left to do
    grown = run_sweep(tiny_pair, problems, out, dataclasses.replace(CONFIG, lambdas=(0.0, 0.25, 0.5, 1.0)))
    assert len(grown) == 24 and len(redone) == 18  # a grown grid runs only what is new


def test_one_process_finishes_what_a_split_sweep_left_in_parts(tiny_pair, tmp_path, monkeypatch):
    problems = toy_problems(n_per_level=1)
    reference = run_sweep(tiny_pair, problems, tmp_path / "reference", CONFIG)
    out = tmp_path / "split"
    settings = (tmp_path / "reference" / "settings.json").read_text()
    out.mkdir()
    (out / "settings.json").write_text(settings)
    left = [r for r in reference if r["lambda"] == 0.5]  # what a dead split job's process 1 wrote
    JsonlLog(part_path(out / RECORDS_FILE, 1)).extend(left)
    real, redone = sweep_module.answer_on_engine, []
    monkeypatch.setattr(sweep_module, "answer_on_engine", lambda *a, **k: redone.extend(a[2]) or real(*a, **k))
    resumed = run_sweep(tiny_pair, problems, out, CONFIG)
    assert len(redone) == 12 and _by_key(resumed) == _by_key(reference)
    assert [r for r in resumed if r["lambda"] == 0.5] == left and not part_paths(out / RECORDS_FILE)


def test_other_settings_or_models_are_refused_not_reused(tiny_pair, tmp_path, tmp_path_factory):
    problems = toy_problems(n_per_level=1)[:2]
    run_sweep(tiny_pair, problems, tmp_path, CONFIG)
    before = (tmp_path / RECORDS_FILE).read_text()
    with pytest.raises(StaleResultsError, match='template: "thinking" stored, "instruct" now; max_new_tokens: 10 stored, 8 now'):
        run_sweep(tiny_pair, problems, tmp_path, dataclasses.replace(CONFIG, max_new_tokens=8, template="instruct"))
    with pytest.raises(StaleResultsError, match="temperature"):
        run_sweep(tiny_pair, problems, tmp_path, dataclasses.replace(CONFIG, sampling=Sampling(temperature=0.7)))
    other = load_pair(*write_tiny_pair(tmp_path_factory, seeds=(0, 2)))  # same Instruct end, another Thinking end
    with pytest.raises(StaleResultsError, match="thinking_weights") as refused:
        run_sweep(other, problems, tmp_path, CONFIG)
    assert "instruct_weights" not in str(refused.value)
    changed = [dataclasses.replace(problems[0], answer="12345"), problems[1]]
    with pytest.raises(StaleResultsError, match=f"problem {problems[0].id}"):
        run_sweep(tiny_pair, changed, tmp_path, CONFIG)
    assert (tmp_path / RECORDS_FILE).read_text() == before  # nothing was added or lost
    aside = sweep_module.ResultsFolder(tmp_path).start_fresh()
    assert (aside / RECORDS_FILE).read_text() == before
    assert len(run_sweep(tiny_pair, problems, tmp_path, dataclasses.replace(CONFIG, max_new_tokens=8))) == 6


def test_sampled_records_do_not_depend_on_batching_or_interruption(tiny_pair, tmp_path, monkeypatch):
    problems = toy_problems(n_per_level=1)
    sampled = dataclasses.replace(CONFIG, sampling=Sampling(temperature=1.0), seed=3)
    whole = run_sweep(tiny_pair, problems, tmp_path / "whole", dataclasses.replace(sampled, batch_size=6))
    monkeypatch.setattr(sweep_module, "answer_on_engine", interrupted_on_call(sweep_module.answer_on_engine, 3))
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tiny_pair, problems, tmp_path / "pieces", sampled)  # 4 slots; two lambdas done
    resumed = run_sweep(tiny_pair, problems[::-1], tmp_path / "pieces", dataclasses.replace(sampled, batch_size=1))
    assert _by_key(resumed) == _by_key(whole)
    other_seed = run_sweep(tiny_pair, problems, tmp_path / "seed4", dataclasses.replace(sampled, seed=4))
    assert [r["response"] for r in _by_key(other_seed)] != [r["response"] for r in _by_key(whole)]


def test_records_table_and_frontier(tiny_pair, tmp_path):
    records = run_sweep(tiny_pair, toy_problems(n_per_level=1)[:2], tmp_path, CONFIG)
    for r in records:
        assert set(r) >= {"lambda", "id", "response", "correct", "output_tokens", "think_opened", "think_closed", "thought_chars"}
        assert 1 <= r["output_tokens"] <= CONFIG.max_new_tokens
        assert r["think_opened"]  # the thinking template opens the block at every lambda
    points = sweep_points(records)
    assert [p.lam for p in points] == [0.0, 0.5, 1.0]
    assert "lambda" in format_table(points)
    assert plot_frontier(points, tmp_path / "f.png").stat().st_size > 0


def test_frontier_panels_side_by_side(tmp_path):
    """Two sweeps (e.g. two pairs), one panel each: the figure is two single frontiers wide."""
    a = [SweepPoint(0.0, 0.3, 5, 0, 0.0, 10), SweepPoint(1.0, 0.7, 60, 1, 0.0, 10)]
    b = [SweepPoint(0.0, 0.0, 115, 0, 0.0, 10), SweepPoint(0.5, 0.3, 50, 0.5, 0.0, 10), SweepPoint(1.0, 0.7, 50, 1, 0.0, 10)]
    one = imread(plot_frontier(a, tmp_path / "one.png"))
    two = imread(plot_frontier_panels([("toy", a, ()), ("smollm2", b, [("router", 50.0, 0.72)])], tmp_path / "two.png"))
    assert two.shape[0] == one.shape[0] and two.shape[1] == 2 * one.shape[1]


def test_frontier_shape_is_measured_not_assumed():
    pts = [SweepPoint(0.0, 0.3, 5, 0, 0.0, 10), SweepPoint(0.5, 0.6, 20, 0.5, 0.0, 10), SweepPoint(1.0, 0.7, 60, 1, 0.0, 10)]
    assert [p.lam for p in pareto_frontier(pts)] == [0.0, 0.5, 1.0]
    assert frontier_shape(pts) == {"monotonic_in_lambda": True, "convex_frontier": True}
    dented = [SweepPoint(0.0, 0.3, 5, 0, 0.0, 10), SweepPoint(0.5, 0.35, 50, 0.5, 0.0, 10), SweepPoint(1.0, 0.7, 60, 1, 0.0, 10)]
    assert frontier_shape(dented)["convex_frontier"] is False
    falling = [SweepPoint(0.0, 0.5, 5, 0, 0.0, 10), SweepPoint(1.0, 0.4, 60, 1, 0.0, 10)]
    assert frontier_shape(falling)["monotonic_in_lambda"] is False


def test_crowded_points_are_labelled_once_frontier_first():
    # lambdas 0.6..1.0 sit on top of each other at the thinking end; 0.9 is the frontier's best
    pts = [SweepPoint(0.0, 0.3, 13, 0, 0.0, 60), SweepPoint(0.4, 0.75, 40, 0.6, 0.0, 60)]
    pts += [SweepPoint(lam, acc, 47.2, 1, 0.0, 60) for lam, acc in ((0.6, 0.967), (0.7, 0.967), (0.8, 0.983), (0.9, 1.0), (1.0, 1.0))]
    labelled = [p.lam for p in frontier_labels(pts, pareto_frontier(pts))]
    assert labelled == [0.0, 0.4, 0.9]


def test_bad_sweep_config():
    with pytest.raises(ValueError, match="template"):
        SweepConfig(template="both")
    with pytest.raises(ValueError, match="lambdas"):
        SweepConfig(lambdas=())
    with pytest.raises(ValueError, match="extrapolate"):
        SweepConfig(lambdas=(0.0, 1.5))
    with pytest.raises(ValueError, match="ids must be unique"):
        run_sweep(None, [Problem("a", "q", "1", "s")] * 2, "unused", CONFIG)


@pytest.mark.usefixtures("highest_precision")
@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.0, top_k=20)])
def test_records_on_the_engine_equal_the_static_path(tmp_path, sampling):
    """Today's static path (one generate per batch of 16 on the materialized theta) gives the
    same records, record for record, as the engine: greedy, and sampled with the per-record keys."""
    pair = load_toy_pair()
    problems = toy_problems(n_per_level=3)  # 18: levels 1-6, short and long answers
    config = SweepConfig(lambdas=(0.0, 0.4, 1.0), max_new_tokens=48, batch_size=4, style="toy", sampling=sampling, seed=2)
    records = run_sweep(pair, problems, tmp_path, config, progress=False)
    static = []
    for lam in config.lambdas:
        theta = interpolate(pair.instruct, pair.thinking, lam)
        for lo in range(0, len(problems), 16):
            batch = problems[lo : lo + 16]
            keys = None if sampling.greedy else record_keys(config.seed, lam, [p.id for p in batch])
            answers = answer(theta, pair.cfg, pair.tokenizers["thinking"], batch, style="toy", max_new_tokens=48,
                             sampling=sampling, keys=keys)  # fmt: skip
            static += [{"lambda": lam, "template": "thinking", **r} for r in answers]
    assert _by_key(records) == _by_key(static)
    assert {r["truncated"] for r in records} == {True, False} and len({r["output_tokens"] for r in records}) > 5
