"""Lambda sweeps: answer a benchmark on theta(lambda) for a grid of lambdas, grade, record.

Records go to ``records.jsonl`` in a results folder as each batch finishes; rerunning into the
same folder skips finished (lambda, problem) pairs, so an interrupted sweep resumes where it
stopped, and a grown grid (more lambdas, more problems) only runs what is new. The folder's
``settings.json`` pins everything else that changes a record (both models' content hashes,
template, prompt style, sampling, seed, token budget, dtype, KV cache): other settings are
refused, not mixed in.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp

from dami_jax.dami.pair import TEMPLATES, ModelPair, template_for
from dami_jax.decoding.cache import CacheConfig, DenseCacheConfig
from dami_jax.decoding.generation import PROMPT_BUCKET
from dami_jax.decoding.sampling import GREEDY, Sampling
from dami_jax.distributed import barrier, leader
from dami_jax.engine.engine import Engine
from dami_jax.evals.answering import answer_on_engine, problem_hash
from dami_jax.evals.benchmarks import Problem
from dami_jax.evals.grid import run_grid
from dami_jax.evals.prompts import prompt_tokens
from dami_jax.evals.records import ResultsFolder, SharedLog, StaleResultsError, merge_parts
from dami_jax.tailorkv.cache import TailorKVConfig

DEFAULT_LAMBDAS = tuple(round(0.1 * i, 1) for i in range(11))
STYLES = ("boxed", "toy")
RECORDS_FILE = "records.jsonl"


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    max_new_tokens: int = 256
    batch_size: int = 16
    template: str = "thinking"  # whose chat template renders each lambda's prompt (dami_jax.dami.pair.TEMPLATES)
    sampling: Sampling = GREEDY
    seed: int = 0
    style: str = "boxed"  # prompt style (dami_jax.evals.prompts.math_prompt): "boxed", or "toy" for the toy pair
    extrapolate: bool = False  # allow lambdas outside [0, 1]
    benchmark: str = "custom"  # the problem set's name, recorded with the results (ids key the records)
    cache: CacheConfig = DenseCacheConfig()  # each engine slot's cache: dense, or a TailorKVConfig

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {self.template!r}")
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
        if not self.lambdas:
            raise ValueError("lambdas: need at least one value")
        outside = [lam for lam in self.lambdas if not 0.0 <= lam <= 1.0]
        if outside and not self.extrapolate:
            raise ValueError(f"lambdas: {outside} outside [0, 1]; set extrapolate=True to go beyond the endpoints")
        if min(self.max_new_tokens, self.batch_size) < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} and batch_size={self.batch_size} must be >= 1")

    def template_for(self, lam: float) -> str:
        return template_for(self.template, lam)

    def settings(self) -> dict[str, Any]:
        """What changes a record besides the models (the lambda grid and batch size do not)."""
        cache = dataclasses.asdict(self.cache) if isinstance(self.cache, TailorKVConfig) else "dense"
        return {
            "benchmark": self.benchmark, "template": self.template, "style": self.style,
            "max_new_tokens": self.max_new_tokens, "seed": self.seed, "sampling": dataclasses.asdict(self.sampling),
            "cache": cache,
        }  # fmt: skip

    @property
    def required(self) -> tuple[str, ...]:
        """Settings a results folder must have recorded (:meth:`ResultsFolder.check`): a folder
        made before caches were recorded holds dense answers, which a TailorKV run must not join."""
        return () if isinstance(self.cache, DenseCacheConfig) else ("cache",)


def pair_settings(pair: ModelPair) -> dict[str, Any]:
    """The settings a sweep records about its models: both content hashes and the dtype."""
    fingerprints = pair.fingerprints()
    dtype = jax.tree.leaves(pair.instruct)[0].dtype
    return {"instruct_weights": fingerprints["instruct"], "thinking_weights": fingerprints["thinking"], "dtype": str(dtype)}


def record_keys(seed: int, lam: float, problem_ids: Sequence[str]) -> jax.Array:
    """One PRNG key per problem from (seed, lambda, problem id) alone, so that a sampled answer is
    the same however the sweep was batched, ordered or interrupted."""
    data = jnp.asarray([cell_hash(lam, i) for i in problem_ids], jnp.uint32)
    return jax.vmap(lambda d: jax.random.fold_in(jax.random.key(seed), d))(data)


def sweep_engine(pair: ModelPair, prompts: Iterable[Sequence[int]], config: SweepConfig, admission: str = "fifo") -> Engine:
    """The engine a sweep (or route-eval) answers on: ``config.batch_size`` slots, rows just long
    enough for the longest of ``prompts`` and the token budget."""
    longest = max((len(p) for p in prompts), default=1)
    max_len = min(pair.cfg.max_position_embeddings, -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET + config.max_new_tokens)
    tailorkv = isinstance(config.cache, TailorKVConfig)  # its slots' store of generated tokens holds the budget
    return Engine(pair, slots=config.batch_size, max_len=max_len, extrapolate=config.extrapolate, admission=admission,
                  cache=config.cache, max_new_tokens=config.max_new_tokens if tailorkv else None)  # fmt: skip


def _key(record: dict[str, Any]) -> tuple[float, str]:
    return round(float(record["lambda"]), 6), str(record["id"])


def run_sweep(
    pair: ModelPair,
    problems: Sequence[Problem],
    out_dir: str | Path,
    config: SweepConfig = SweepConfig(),
    *,
    progress: bool = True,
    split: bool = False,
) -> list[dict[str, Any]]:
    """Sweep ``config.lambdas`` over ``problems`` into the results folder ``out_dir``; returns all
    records of this grid (old and new). Raises :class:`StaleResultsError` when the folder holds
    results made with other settings or other problems under the same ids
    (``ResultsFolder(out_dir).start_fresh()`` moves them aside).

    ``split``: every process of a ``jax.distributed`` job calls this with the same arguments and
    answers its share of the (lambda, problem) cells (:func:`owner`) on its own devices, into a
    part of the records of its own (:class:`~dami_jax.evals.records.SharedLog`); once all are done,
    process 0 merges the parts into ``records.jsonl`` and every process returns the whole grid. A
    rerun, with any number of processes or without ``split``, answers only what no process finished."""
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError("problems: ids must be unique (they key the resumable log)")
    folder = ResultsFolder(out_dir)
    folder.claim({**config.settings(), **pair_settings(pair)}, config.required)
    if split:
        log = SharedLog(folder.path / RECORDS_FILE, jax.process_index())
    else:  # one process owns the folder: what a split job that died left in parts joins the log first
        merge_parts(folder.path / RECORDS_FILE, _key)
        log = folder.log(RECORDS_FILE)
    by_id = {p.id: p for p in problems}
    hashes = {p.id: problem_hash(p) for p in problems}
    changed = {r["id"]: r.get("problem_hash") for r in log.records if hashes.get(r["id"], r.get("problem_hash")) != r.get("problem_hash")}
    if changed:
        first = min(changed)
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        raise StaleResultsError(folder.path, {f"problem {first}{more}": (changed[first], hashes[first])})
    lambdas = list(dict.fromkeys(round(float(lam), 6) for lam in config.lambdas))
    templates = sorted({config.template_for(lam) for lam in lambdas})
    prompts = {(t, p.id): prompt_tokens(pair.tokenizers[t], p, config.style) for t in templates for p in problems}
    engine = sweep_engine(pair, prompts.values(), config)

    def work(lam: float, pending: list[str]) -> Iterator[list[dict[str, Any]]]:
        template = config.template_for(lam)
        keys = None if config.sampling.greedy else record_keys(config.seed, lam, pending)
        answers = answer_on_engine(engine, pair.tokenizers[template], [by_id[i] for i in pending],
                                   [prompts[template, i] for i in pending], [lam] * len(pending),
                                   max_new_tokens=config.max_new_tokens, sampling=config.sampling, keys=keys)  # fmt: skip
        for records in answers:
            yield [{"lambda": lam, "template": template, **r} for r in records]

    processes, index = (jax.process_count(), jax.process_index()) if split else (1, 0)
    records = run_grid(log, lambdas, ids, _key, work, desc="sweep", unit="answer", describe=lambda lam: f"lambda={lam:g}",
                       progress=progress, mine=lambda lam, i: owner(lam, i, processes) == index)  # fmt: skip
    if not split:
        return records
    barrier(f"sweep {folder.path}: answered")
    if leader():
        merge_parts(folder.path / RECORDS_FILE, _key)
    barrier(f"sweep {folder.path}: merged")
    wanted = {(lam, i) for lam in lambdas for i in ids}
    return [r for r in folder.log(RECORDS_FILE).records if _key(r) in wanted]


def owner(lam: float, problem_id: str, processes: int) -> int:
    """Which of ``processes`` answers (lambda, problem) in a split sweep: by :func:`cell_hash`, so
    that the shares are even and a rerun deals them out the same way."""
    return cell_hash(lam, problem_id) % processes


def cell_hash(lam: float, problem_id: str) -> int:
    """A stable 32-bit hash of a (lambda, problem) cell: its sampling key and its process derive from it."""
    return zlib.crc32(f"{lam:.6f}/{problem_id}".encode())
