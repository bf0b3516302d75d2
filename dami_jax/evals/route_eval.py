"""Judge DAMI's routers against fixed lambdas and the oracle (``dami-jax route-eval``).

Everything goes into one results folder and resumes like a sweep:

- ``sweep/``: the evaluation problems answered at every lambda of the grid (a plain
  :func:`dami_jax.evals.sweep.run_sweep`): the baselines (Instruct = lambda 0, Thinking = lambda 1,
  every fixed lambda) and the oracle (:func:`dami_jax.dami.oracle.oracle_choice`) come from it.
- ``conf-signals.jsonl``: DAMI-Conf's drafts, graded, with their confidence and discrepancy.
- ``routed.jsonl``: each router's answers, served at its lambdas on the engine
  (:class:`dami_jax.engine.engine.Engine`, continuous batching with a lambda per slot; its tokens
  are the cost; DAMI-Conf's draft tokens count too).
- ``summary.json`` (one entry per method), ``paired.json`` (each method against Thinking on the same
  problems: the discordant counts and McNemar's exact p-value), ``frontier.png`` (routers as points on the fixed-lambda
  frontier), and for DAMI-Conf ``sensitivity.json`` / ``sensitivity.png``: its hyperparameter grid,
  each setting scored by looking its lambdas up in the sweep (exact for greedy decoding, which the
  served answers confirm).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from dami_jax.dami.conf_router import ConfMap, draft_signals
from dami_jax.dami.oracle import oracle_choice
from dami_jax.dami.pair import ModelPair
from dami_jax.dami.pref_router import META_FILE, PrefRouter, load_pref_router
from dami_jax.errors import InputError
from dami_jax.evals.answering import answer_on_engine, grade_rows
from dami_jax.evals.benchmarks import Problem
from dami_jax.evals.frontier import sweep_points
from dami_jax.evals.paired import Paired, paired
from dami_jax.evals.grid import run_grid
from dami_jax.evals.plots import plot_frontier, plot_sensitivity
from dami_jax.evals.prompts import prompt_tokens
from dami_jax.evals.records import ResultsFolder
from dami_jax.evals.router_data import rollouts
from dami_jax.evals.router_training import PROMPT_TEMPLATE, router_features
from dami_jax.evals.stats import format_interval
from dami_jax.evals.sweep import SweepConfig, pair_settings, record_keys, run_sweep, sweep_engine
from dami_jax.files import write_atomic

SWEEP_DIR = "sweep"
SIGNALS_FILE = "conf-signals.jsonl"
ROUTED_FILE = "routed.jsonl"
SUMMARY_FILE = "summary.json"
PAIRED_FILE = "paired.json"
REFERENCE = "thinking"  # what every method is tested against, on the same problems
SPECIAL_ROUTERS = ("conf", "oracle")
# DAMI-Conf's sensitivity grid (every combination is scored from the sweep records).
SENSITIVITY_GRID = {
    "conf_weight": (0.5, 1.0, 2.0, 4.0), "disc_weight": (0.0, 1.0, 2.0),
    "accept_below": (0.02, 0.05, 0.1, 0.2, 0.3), "floor": (0.3, 0.5, 0.7, 1.0),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RouteEvalConfig:
    sweep: SweepConfig = SweepConfig()  # the grid, budget, template and sampling every answer uses
    cost_weight: float = 0.0  # DAMI-Pref's accuracy/tokens knob
    conf_map: ConfMap = ConfMap()
    max_draft_tokens: int = 32  # DAMI-Conf's draft budget


@dataclasses.dataclass(frozen=True)
class MethodResult:
    method: str  # instruct, thinking, fixed-<lam>, oracle, dami-pref, dami-conf
    accuracy: float
    mean_tokens: float
    mean_lambda: float
    n: int
    wall_s: float | None = None  # wall time of all its answers (None: not measured)


def summarize(method: str, records: Sequence[dict[str, Any]]) -> MethodResult:
    walls = [r.get("wall_s") for r in records]
    return MethodResult(
        method, float(np.mean([r["correct"] for r in records])), float(np.mean([r["output_tokens"] for r in records])),
        float(np.mean([r["lambda"] for r in records])), len(records), None if None in walls else float(sum(walls)),
    )  # fmt: skip


def baseline_name(lam: float) -> str:
    return "instruct" if lam == 0.0 else "thinking" if lam == 1.0 else f"fixed-{lam:g}"


def format_results(results: Sequence[MethodResult]) -> str:
    """One row per method; the accuracy's 95% Wilson interval beside it."""
    lines = [f"{'method':<14} {'accuracy':>8} {'95% CI':>14} {'mean tokens':>11} {'mean lambda':>11} {'wall s':>7} {'n':>5}"]
    for r in results:
        wall = "-" if r.wall_s is None else f"{r.wall_s:.1f}"
        lines.append(f"{r.method:<14} {r.accuracy:8.3f} {format_interval(r.accuracy, r.n):>14} {r.mean_tokens:11.1f} "
                     f"{r.mean_lambda:11.2f} {wall:>7} {r.n:5d}")  # fmt: skip
    return "\n".join(lines)


def _key(record: dict[str, Any]) -> tuple[str, str]:
    return record["method"], record["id"]


class _Evaluation:
    """One route-eval run: the pair, the problems, the folder and the sweep they are judged by."""

    def __init__(self, pair: ModelPair, problems: Sequence[Problem], folder: ResultsFolder, config: RouteEvalConfig, progress: bool):
        self.pair, self.problems, self.folder, self.config, self.progress = pair, list(problems), folder, config, progress
        self.by_id = {p.id: p for p in self.problems}
        self.grid = tuple(sorted(dict.fromkeys(round(float(lam), 6) for lam in config.sweep.lambdas)))
        records = run_sweep(pair, self.problems, folder.path / SWEEP_DIR, config.sweep, progress=progress)
        self.sweep = {(round(float(r["lambda"]), 6), r["id"]): r for r in records}
        self.routed = folder.log(ROUTED_FILE)
        self.correct: dict[str, dict[str, bool]] = {}  # method -> problem id -> right? (for the paired tests)

    def summarize(self, method: str, records: Sequence[dict[str, Any]]) -> MethodResult:
        self.correct[method] = {r["id"]: bool(r["correct"]) for r in records}
        return summarize(method, records)

    def baselines(self) -> list[MethodResult]:
        return [self.summarize(baseline_name(lam), [self.sweep[(lam, p.id)] for p in self.problems]) for lam in self.grid]

    def oracle(self) -> MethodResult:
        chosen = [self.sweep[(oracle_choice(rollouts(self.sweep, self.grid, p.id)).lam, p.id)] for p in self.problems]
        return self.summarize("oracle", chosen)

    def paired(self) -> list[Paired]:
        """Every other method against Thinking on the same problems (none without lambda 1 in the grid)."""
        if REFERENCE not in self.correct:
            return []
        return [paired(m, c, REFERENCE, self.correct[REFERENCE]) for m, c in self.correct.items() if m != REFERENCE]

    def serve(self, problems: Sequence[Problem], lambdas: Sequence[float]) -> Iterator[list[dict[str, Any]]]:
        """Answer ``problems`` at per-problem ``lambdas`` on the engine (each prompt in the template
        its lambda takes); yields graded records with their ``lambda`` as they finish."""
        sweep = self.config.sweep
        prompts = [prompt_tokens(self.pair.tokenizers[sweep.template_for(lam)], p, sweep.style) for p, lam in zip(problems, lambdas)]
        keys = None if sweep.sampling.greedy else jnp.concatenate([record_keys(sweep.seed, lam, [p.id]) for p, lam in zip(problems, lambdas)])
        engine = sweep_engine(self.pair, prompts, sweep, admission="lambda")  # the whole batch is known: lambda order
        lambda_of = {p.id: float(lam) for p, lam in zip(problems, lambdas)}
        answers = answer_on_engine(engine, self.pair.tokenizers["thinking"], problems, prompts, lambdas,
                                   max_new_tokens=sweep.max_new_tokens, sampling=sweep.sampling, keys=keys)  # fmt: skip
        for records in answers:
            yield [{**r, "lambda": lambda_of[r["id"]]} for r in records]

    def run_router(self, method: str, lambdas: dict[str, float], drafts: dict[str, dict[str, Any]] | None = None) -> MethodResult:
        """Serve every problem at ``lambdas[id]`` into ``routed.jsonl`` (resumable). ``drafts``
        (DAMI-Conf): each problem's draft record; an accepted draft is the answer, and a problem
        answered again still pays for its draft's tokens and time."""
        drafts = drafts or {}

        def cost(record: dict[str, Any]) -> dict[str, Any]:
            draft = drafts.get(record["id"])
            if draft is None:
                return record
            return {**record, "served_tokens": record["output_tokens"], "draft_tokens": draft["draft_tokens"],
                    "output_tokens": record["output_tokens"] + draft["draft_tokens"], "wall_s": record["wall_s"] + draft["wall_s"]}  # fmt: skip

        def work(_, pending: list[str]) -> Iterator[list[dict[str, Any]]]:
            accepted = [{**drafts[i], "method": method, "accepted": True} for i in pending if drafts.get(i, {}).get("accepted")]
            if accepted:
                yield accepted
            rest = [i for i in pending if not drafts.get(i, {}).get("accepted")]
            if rest:
                for records in self.serve([self.by_id[i] for i in rest], [lambdas[i] for i in rest]):
                    yield [{"method": method, **cost(r)} for r in records]

        records = run_grid(self.routed, [method], [p.id for p in self.problems], _key, work,
                           desc=method, unit="answer", progress=self.progress)  # fmt: skip
        return self.summarize(method, records)

    # ------------------------------------------------------------------ DAMI-Pref

    def pref(self, router: PrefRouter, router_dir: Path) -> MethodResult:
        features = router_features(self.pair, self.problems, router.info.prompt["style"], router.info.spec, router_dir,
                                   router.info.fingerprint, progress=self.progress)  # fmt: skip
        chosen = router.lambdas(features, cost_weight=self.config.cost_weight)
        return self.run_router("dami-pref", {p.id: float(lam) for p, lam in zip(self.problems, chosen)})

    # ------------------------------------------------------------------ DAMI-Conf

    def draft(self) -> dict[str, dict[str, Any]]:
        """Each problem's graded draft with its confidence and discrepancy (``conf-signals.jsonl``)."""
        sweep, tokenizer = self.config.sweep, self.pair.tokenizers[PROMPT_TEMPLATE]

        def work(_, pending: list[str]) -> Iterator[list[dict[str, Any]]]:
            for lo in range(0, len(pending), sweep.batch_size):
                problems = [self.by_id[i] for i in pending[lo : lo + sweep.batch_size]]
                prompts = [prompt_tokens(tokenizer, p, sweep.style) for p in problems]
                started = time.perf_counter()
                signals = draft_signals(self.pair, prompts, max_draft_tokens=self.config.max_draft_tokens, batch_size=len(prompts))
                seconds = (time.perf_counter() - started) / len(problems)
                graded = grade_rows(self.pair.cfg, tokenizer, problems, prompts, signals.drafts)
                yield [{"method": "draft", **r, "lambda": 0.0, "draft_tokens": r["output_tokens"], "wall_s": seconds,
                        "confidence": float(c), "discrepancy": float(d)}
                       for r, c, d in zip(graded, signals.confidence, signals.discrepancy)]  # fmt: skip

        log = self.folder.log(SIGNALS_FILE)
        records = run_grid(log, ["draft"], [p.id for p in self.problems], _key, work, desc="drafts", unit="draft", progress=self.progress)
        return {r["id"]: r for r in records}

    def conf(self, signals: dict[str, dict[str, Any]]) -> MethodResult:
        ids = [p.id for p in self.problems]
        lambdas, accept = self.config.conf_map.route(
            np.asarray([signals[i]["confidence"] for i in ids]), np.asarray([signals[i]["discrepancy"] for i in ids]), self.grid
        )  # fmt: skip
        drafts = {i: {**signals[i], "accepted": bool(ok)} for i, ok in zip(ids, accept)}
        return self.run_router("dami-conf", dict(zip(ids, lambdas.tolist())), drafts)

    def sensitivity(self, signals: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """Every :data:`SENSITIVITY_GRID` setting of :class:`ConfMap`, scored from the sweep."""
        ids = [p.id for p in self.problems]
        conf = np.asarray([signals[i]["confidence"] for i in ids])
        disc = np.asarray([signals[i]["discrepancy"] for i in ids])
        rows = []
        for values in itertools.product(*SENSITIVITY_GRID.values()):
            mapping = ConfMap(**dict(zip(SENSITIVITY_GRID, values)))
            lambdas, accept = mapping.route(conf, disc, self.grid)
            correct, tokens = [], []
            for i, lam, ok in zip(ids, lambdas.tolist(), accept):
                draft = signals[i]
                answer = draft if ok else self.sweep[(round(lam, 6), i)]
                correct.append(answer["correct"])
                tokens.append(draft["draft_tokens"] + (0 if ok else answer["output_tokens"]))
            rows.append({**dataclasses.asdict(mapping), "accuracy": float(np.mean(correct)), "mean_tokens": float(np.mean(tokens)),
                         "accept_rate": float(np.mean(accept)), "mean_lambda": float(np.mean(lambdas))})  # fmt: skip
        return rows


def _router_digest(router_dir: Path) -> str:
    """Names the router's training (its settings, data and history): a retrained router is another router."""
    return hashlib.sha256((router_dir / META_FILE).read_bytes()).hexdigest()[:16]


def route_eval(
    pair: ModelPair,
    problems: Sequence[Problem],
    out_dir: str | Path,
    routers: Sequence[str | Path],
    config: RouteEvalConfig = RouteEvalConfig(),
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``routers`` (a DAMI-Pref router folder, ``"conf"``, ``"oracle"``) on ``problems``
    against every fixed lambda of the grid; baselines and the oracle are always reported. Returns
    {"results": [MethodResult...], "paired": [Paired...] (each against Thinking), "sensitivity": rows or None,
    "files": {name: path}}."""
    pref_dirs = [Path(r) for r in routers if str(r) not in SPECIAL_ROUTERS]
    if len(pref_dirs) > 1:
        raise InputError(f"one DAMI-Pref router per evaluation, got {len(pref_dirs)}: {', '.join(map(str, pref_dirs))}")
    folder = ResultsFolder(out_dir)
    settings: dict[str, Any] = {**config.sweep.settings(), **pair_settings(pair)}
    if pref_dirs:
        router = load_pref_router(pref_dirs[0], fingerprint=settings["instruct_weights"])
        if router.info.prompt["style"] != config.sweep.style:
            raise InputError(f"{pref_dirs[0]} was trained on {router.info.prompt['style']!r} prompts; this evaluation renders "
                             f"{config.sweep.style!r} ones")  # fmt: skip
        settings.update({"dami-pref": _router_digest(pref_dirs[0]), "cost_weight": config.cost_weight})
    if "conf" in map(str, routers):
        settings.update({"dami-conf": dataclasses.asdict(config.conf_map), "max_draft_tokens": config.max_draft_tokens})
    folder.claim(settings, config.sweep.required)
    run = _Evaluation(pair, problems, folder, config, progress)
    results = [*run.baselines(), run.oracle()]
    sensitivity = None
    if pref_dirs:
        results.append(run.pref(router, pref_dirs[0]))
    if "conf" in map(str, routers):
        signals = run.draft()
        results.append(run.conf(signals))
        sensitivity = run.sensitivity(signals)
    tests = run.paired()
    files = {"summary": write_atomic(folder.path / SUMMARY_FILE, json.dumps([dataclasses.asdict(r) for r in results], indent=1) + "\n"),
             "paired": write_atomic(folder.path / PAIRED_FILE, json.dumps([dataclasses.asdict(t) for t in tests], indent=1) + "\n")}  # fmt: skip
    points = sweep_points(run.sweep.values())
    marks = [(r.method, r.mean_tokens, r.accuracy) for r in results if r.method in ("oracle", "dami-pref", "dami-conf")]
    files["frontier"] = plot_frontier(points, folder.path / "frontier.png", title="DAMI routers on the lambda frontier", marks=marks)
    if sensitivity is not None:
        files["sensitivity"] = write_atomic(folder.path / "sensitivity.json", json.dumps(sensitivity, indent=1) + "\n")
        files["sensitivity_plot"] = plot_sensitivity(sensitivity, points, folder.path / "sensitivity.png")
    return {"results": results, "paired": tests, "sensitivity": sensitivity, "files": files}
