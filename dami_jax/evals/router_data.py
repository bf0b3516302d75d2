"""What DAMI's routers learn from and are judged on: sweep records as rollouts, the router split,
and evaluation mixes (ours).

- :func:`read_sweeps` gathers the records of one or more sweep folders (``dami-jax sweep``) made
  with the same models and settings: per problem, its answer at each lambda of the grid.
- :func:`router_split` decides by a hash of the problem id which problems may train a router and
  which evaluate it, so the two never overlap whatever folders or orders they come in.
- :func:`mix_problems` draws an evaluation mix by difficulty level (the toy benchmark's levels):
  ``uniform`` (levels 1-6 equally) or ``easy-heavy`` (4:2:1:1:1:1, most traffic easy, as in real
  use). For the toy pair, levels 2-6 are held out from the LLMs' training; level 1 (the 1,888
  single operations) is in both, so level-1 problems were seen in training by both models.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from dami_jax.dami.preferences import Rollout, split_ids
from dami_jax.errors import InputError
from dami_jax.evals.benchmarks import Problem
from dami_jax.evals.records import JsonlLog, ResultsFolder, part_paths
from dami_jax.evals.sweep import RECORDS_FILE

ROUTER_SALT = "dami-router"  # the train/eval split of problems
VALIDATION_SALT = "dami-router-val"  # early-stopping problems within the training side
EVAL_FRACTION = 0.5
VALIDATION_FRACTION = 0.2
MIXES = {"uniform": (1, 1, 1, 1, 1, 1), "easy-heavy": (4, 2, 1, 1, 1, 1)}
# Settings that may differ between sweep folders pooled for one router (the problem set's name).
POOLABLE = ("benchmark",)


@dataclasses.dataclass(frozen=True)
class SweepData:
    problems: dict[str, Problem]  # id -> problem (question and gold answer, from the records)
    rollouts: dict[str, list[Rollout]]  # id -> its answers on ``grid``, in grid order
    grid: tuple[float, ...]  # the lambdas every problem was answered at
    settings: dict[str, Any]  # the sweeps' settings (models' hashes, template, style, budget, ...)
    digest: str  # content hash of the records used (names a router's training data)


def read_sweeps(folders: Sequence[str | Path]) -> SweepData:
    """Pool the sweep folders' records. Folders must share every setting but the benchmark name;
    a problem id must mean the same problem everywhere; the grid is the lambdas all problems have."""
    if not folders:
        raise InputError("no sweep folders given")
    settings: dict[str, Any] | None = None
    records: dict[tuple[float, str], dict[str, Any]] = {}
    hashes: dict[str, str] = {}
    for folder in map(Path, folders):
        path = folder / RECORDS_FILE
        stored = ResultsFolder(folder).stored_settings()
        if stored is None or not path.is_file():
            raise InputError(f"{folder} is not a sweep folder (no {RECORDS_FILE} with its settings); run dami-jax sweep first")
        if part_paths(path):
            raise InputError(f"{part_paths(path)[0]}: a split sweep did not finish here; rerun it to answer the rest and merge its records")
        shared = {k: v for k, v in stored.items() if k not in POOLABLE}
        if settings is None:
            settings = shared
        elif shared != settings:
            key = next(k for k in sorted(set(shared) | set(settings)) if shared.get(k) != settings.get(k))
            raise InputError(f"{folder} was swept with {key}={json.dumps(shared.get(key))}, the first folder with "
                             f"{json.dumps(settings.get(key))}; a router learns from one setting at a time")  # fmt: skip
        for number, r in enumerate(JsonlLog(path).records, start=1):
            if "question" not in r:
                raise InputError(f"{path}:{number}: no question text (made by an older dami-jax); sweep again into a new folder")
            if hashes.setdefault(r["id"], r["problem_hash"]) != r["problem_hash"]:
                raise InputError(f"{path}:{number}: problem {r['id']} is another problem than in an earlier folder")
            records.setdefault((round(float(r["lambda"]), 6), r["id"]), r)
    lambdas_of: dict[str, set[float]] = {}
    for lam, pid in records:
        lambdas_of.setdefault(pid, set()).add(lam)
    grid = tuple(sorted(set.intersection(*lambdas_of.values()))) if lambdas_of else ()
    if not grid:
        raise InputError(f"{', '.join(map(str, folders))}: no lambda was answered for every problem")
    problems, answers = {}, {}
    for pid in sorted(lambdas_of):
        first = records[(grid[0], pid)]
        problems[pid] = Problem(pid, first["question"], first["gold"], first["source"])
        answers[pid] = rollouts(records, grid, pid)
    digest = hashlib.sha256(json.dumps([[pid, [dataclasses.astuple(r) for r in answers[pid]]] for pid in answers]).encode())
    return SweepData(problems, answers, grid, settings or {}, digest.hexdigest()[:16])


def rollouts(records: dict[tuple[float, str], dict[str, Any]], grid: Sequence[float], pid: str) -> list[Rollout]:
    """Problem ``pid``'s answers on ``grid`` from sweep records keyed by (lambda, id)."""
    return [Rollout(lam, bool(records[(lam, pid)]["correct"]), int(records[(lam, pid)]["output_tokens"])) for lam in grid]


def router_split(ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """(router-training ids, evaluation ids)."""
    return split_ids(ids, EVAL_FRACTION, ROUTER_SALT)


def validation_split(train_ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """(fitting ids, early-stopping ids) within the router-training side."""
    return split_ids(train_ids, VALIDATION_FRACTION, VALIDATION_SALT)


def level_of(problem: Problem) -> int:
    """The difficulty level of a toy problem (its source is ``toy-<level>``)."""
    prefix, _, level = problem.source.partition("-")
    if prefix != "toy" or not level.isdigit():
        raise InputError(f"problem {problem.id} ({problem.source}) has no difficulty level: mixes apply to the toy benchmark")
    return int(level)


def mix_problems(problems: Sequence[Problem], mix: str, size: int) -> list[Problem]:
    """``size`` problems weighted by level as ``MIXES[mix]`` says, the first ones of each level in
    the given order (deterministic); too few problems of a level is an error that says how many."""
    if mix not in MIXES:
        raise InputError(f"mix must be one of {tuple(MIXES)}, got {mix!r}")
    weights = MIXES[mix]
    by_level: dict[int, list[Problem]] = {}
    for p in problems:
        by_level.setdefault(level_of(p), []).append(p)
    counts = [round(size * w / sum(weights)) for w in weights]
    chosen = []
    for level, count in enumerate(counts, start=1):
        have = by_level.get(level, [])
        if len(have) < count:
            raise InputError(f"the {mix} mix of {size} needs {count} level-{level} problems; the evaluation side has {len(have)} "
                             "(use a larger --n-per-level)")  # fmt: skip
        chosen += have[:count]
    return chosen
