"""Static serving: one batch of prompts, each on its own theta(lambda_i), decoded together until
its longest row ends. ``dj.serve`` (:mod:`dami_jax.engine.serve`) batches continuously instead;
this is its baseline in ``scripts/bench_serving.py``.

Two strategies give the same tokens (up to float rounding at intermediate lambdas):
- ``bucketed``: one batched :func:`generate` per distinct lambda, on a theta(lambda) interpolated
  into one reused buffer (no third model); the weights are read once per group and step. Groups
  are padded to a multiple of ``GROUP_BUCKET`` rows, so that any mix of group sizes compiles a
  handful of shapes rather than one per size.
- ``mixed``: one batch and one decode loop; every weight op mixes both endpoints' outputs per row
  (:class:`dami_jax.models.rowmix.RowMix`), so no theta(lambda) exists; both endpoints are read and
  the matmul FLOPs double, but once per step for all lambdas together.
``auto`` picks the one a :class:`CostModel` predicts to be faster: decode steps of this model,
plain and mixed, timed on this device at two batch sizes (so it sees whatever dominates here:
weight reads on a large model, per-row work on a small one), plus the interpolation. It assumes
every group runs all ``max_new_tokens`` steps, while a bucketed group of short (low-lambda)
answers in fact stops early and a mixed batch runs until its longest row is done.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dami_jax.dami.interpolation import interpolate
from dami_jax.dami.pair import ModelPair
from dami_jax.decoding.cache import CacheConfig, DenseCacheConfig, DenseKVCache
from dami_jax.decoding.generation import Generation, decode_step, generate, prepare_prompts
from dami_jax.decoding.sampling import GREEDY, Sampling
from dami_jax.errors import InputError
from dami_jax.models.rowmix import mix_rows

STRATEGIES = ("auto", "bucketed", "mixed")


@dataclasses.dataclass(frozen=True)
class Workload:
    """What the strategies' costs depend on: the batch's composition."""

    group_sizes: tuple[int, ...]  # prompts per distinct lambda
    interpolations: int  # groups whose theta(lambda) must be materialized (lambda not 0 or 1)
    steps: int  # decode steps (max_new_tokens: an upper bound, rows may stop earlier)

    @classmethod
    def of(cls, lambdas: Sequence[float], max_new_tokens: int) -> "Workload":
        """The workload of serving ``lambdas`` (one per prompt)."""
        values, sizes = np.unique(np.asarray(lambdas, np.float32), return_counts=True)
        return cls(tuple(int(n) for n in sizes), int(np.sum((values != 0) & (values != 1))), max_new_tokens)


GROUP_BUCKET = 8  # bucketed groups are padded to a multiple of this many rows, to bound recompiles
PROBE_BATCH = 8  # the second batch size decode steps are timed at (the first is 1)


def group_rows(n: int) -> int:
    """Rows a bucketed group of ``n`` prompts is generated with (padded with repeats of one of them)."""
    return -(-n // GROUP_BUCKET) * GROUP_BUCKET
PROBE_CACHE = 256  # cache slots of the timed steps


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Seconds per decode step as measured on this device for this model, linear in the batch B:
    one model ``single_fixed + single_per_row * B``; per-row mixing ``mixed_fixed + mixed_per_row * B``;
    plus ``interpolation`` seconds per materialized theta(lambda)."""

    single_fixed: float
    single_per_row: float
    mixed_fixed: float
    mixed_per_row: float
    interpolation: float

    @classmethod
    def measure(cls, pair: ModelPair) -> "CostModel":
        """Time jitted decode steps of ``pair``'s model (plain and per-row mixed) at batch 1 and
        ``PROBE_BATCH`` on a ``PROBE_CACHE``-slot cache, and one interpolation; once per process for
        each architecture and dtype (the first call compiles them, a few seconds for small models)."""
        key = (pair.cfg, jax.tree.leaves(pair.instruct)[0].dtype)
        if key not in _MEASURED:
            _MEASURED[key] = _measure(pair)
        return _MEASURED[key]

    def bucketed(self, work: Workload) -> float:
        """Each group decodes on its own, after its interpolation."""
        steps = sum(work.steps * (self.single_fixed + self.single_per_row * group_rows(n)) for n in work.group_sizes)
        return steps + work.interpolations * self.interpolation

    def mixed(self, work: Workload) -> float:
        """One loop for the whole batch."""
        return work.steps * (self.mixed_fixed + self.mixed_per_row * sum(work.group_sizes))

    def predict(self, work: Workload) -> dict[str, float]:
        """Predicted seconds per strategy."""
        return {"bucketed": self.bucketed(work), "mixed": self.mixed(work)}


_MEASURED: dict[tuple[Any, Any], CostModel] = {}


def _measure(pair: ModelPair) -> CostModel:
    step = jax.jit(lambda params, token, cache: decode_step(params, pair.cfg, token, cache)[0])

    def step_seconds(batch: int, mixed: bool) -> float:
        params = mix_rows(pair.instruct, pair.thinking, jnp.full((batch,), 0.5)) if mixed else pair.instruct
        cache = DenseKVCache.create(pair.cfg, jnp.zeros((batch,), jnp.int32), PROBE_CACHE, pair.instruct["embed"].dtype)
        return _best_seconds(step, params, jnp.zeros((batch,), jnp.int32), cache)

    def line(mixed: bool) -> tuple[float, float]:
        one, many = step_seconds(1, mixed), step_seconds(PROBE_BATCH, mixed)
        per_row = max(many - one, 0.0) / (PROBE_BATCH - 1)
        return max(one - per_row, 0.0), per_row

    theta = [interpolate(pair.instruct, pair.thinking, 0.5)]

    def switch():  # as bucketed serving switches lambda: into the previous theta's buffers
        theta[0] = interpolate(pair.instruct, pair.thinking, 0.5, out=theta[0])
        return theta[0]

    return CostModel(*line(False), *line(True), _best_seconds(switch))


def _best_seconds(fn: Callable[..., Any], *args: Any, repeats: int = 5) -> float:
    """Fastest of ``repeats`` calls after a compiling one, waiting for each result."""
    jax.block_until_ready(fn(*args))
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - started)
    return best


def choose_strategy(work: Workload, cost_model: CostModel) -> str:
    """``"bucketed"`` or ``"mixed"``, whichever ``cost_model`` predicts faster (bucketed on a tie).
    One distinct lambda is always the plain single-model path (bucketed with one group)."""
    if len(work.group_sizes) == 1:
        return "bucketed"
    predicted = cost_model.predict(work)
    return "mixed" if predicted["mixed"] < predicted["bucketed"] else "bucketed"


def serve_static(
    pair: ModelPair,
    prompts: Sequence[Sequence[int]],
    lambdas: Sequence[float],
    *,
    strategy: str = "auto",
    max_new_tokens: int = 128,
    sampling: Sampling = GREEDY,
    key: jax.Array | None = None,
    stop_tokens: Sequence[int] | Sequence[Sequence[int]] | None = None,
    cache: CacheConfig = DenseCacheConfig(),
    cost_model: CostModel | None = None,
    progress: bool = False,
    extrapolate: bool = False,
) -> Generation:
    """Generate for each prompt (rendered token ids) on theta(lambdas[i]); rows in ``prompts``' order.

    ``strategy``: ``"bucketed"``, ``"mixed"`` or ``"auto"`` (from ``cost_model``, by default
    :meth:`CostModel.measure`). ``key``: one PRNG key, split into one per prompt, or one per
    prompt [B]; either way a row's tokens depend on its own key only, never on how the batch was
    grouped. ``stop_tokens`` (shared or per prompt) and ``cache`` (e.g. ``TailorKVConfig``) are
    :func:`generate`'s. ``progress``: a bar over the bucketed groups. ``extrapolate`` allows
    lambdas outside [0, 1].
    """
    if strategy not in STRATEGIES:
        raise InputError(f"strategy: must be one of {STRATEGIES}, got {strategy!r}")
    lam = check_lambdas(lambdas, len(prompts), extrapolate)
    prepare_prompts(prompts, pair.cfg, max_new_tokens)  # fail before any work
    keys = row_keys(key, sampling, len(prompts))
    per_row_stops = stop_rows(stop_tokens, len(prompts))
    if strategy == "auto":
        strategy = choose_strategy(Workload.of(lam, max_new_tokens), cost_model or CostModel.measure(pair))
    options = dict(max_new_tokens=max_new_tokens, sampling=sampling, cache=cache)
    if strategy == "mixed":
        mixed = mix_rows(pair.instruct, pair.thinking, lam)
        return generate(mixed, pair.cfg, prompts, key=keys, stop_tokens=stop_tokens, **options)
    groups: dict[float, list[int]] = {}
    for i, value in enumerate(lam.tolist()):
        groups.setdefault(value, []).append(i)
    theta, parts, order = None, [], []
    for value, rows in tqdm(sorted(groups.items()), desc="serve", unit="lambda", disable=not progress):
        if value in (0.0, 1.0):
            params = pair.instruct if value == 0.0 else pair.thinking  # what interpolate would return, bit for bit
        else:
            params = theta = interpolate(pair.instruct, pair.thinking, value, out=theta, extrapolate=extrapolate)
        padded = rows + rows[:1] * (group_rows(len(rows)) - len(rows))  # repeats of a row add no steps
        out = generate(
            params, pair.cfg, [prompts[i] for i in padded], key=None if keys is None else keys[np.asarray(padded)],
            stop_tokens=stop_tokens if per_row_stops is None else [per_row_stops[i] for i in padded], **options,
        )  # fmt: skip
        parts.append(jax.tree.map(lambda x: x[: len(rows)], out))
        order += rows
    inverse = np.argsort(order)
    return jax.tree.map(lambda *xs: jnp.concatenate(xs)[inverse], *parts)


def check_lambdas(lambdas: Sequence[float], batch: int, extrapolate: bool) -> np.ndarray:
    """-> float32 [B], checked: one finite lambda per prompt, in [0, 1] unless ``extrapolate``."""
    lam = np.asarray(lambdas, np.float32)
    if lam.shape != (batch,):
        raise InputError(f"lambdas: need one lambda per prompt ({batch}), got shape {lam.shape}")
    if not np.isfinite(lam).all():
        raise InputError(f"lambdas: row {int(np.flatnonzero(~np.isfinite(lam))[0])} is not finite")
    outside = np.flatnonzero((lam < 0) | (lam > 1))
    if not extrapolate and outside.size:
        row = outside[0]
        raise InputError(f"lambdas: row {row} is {lam[row]}, outside [0, 1]; pass extrapolate=True to go beyond")
    return lam


def row_keys(key: jax.Array | None, sampling: Sampling, batch: int) -> jax.Array | None:
    """One PRNG key per prompt [B] (split from a single key), or None when greedy without a key."""
    if key is None:
        if not sampling.greedy:
            raise InputError("key: sampling with temperature > 0 needs an explicit PRNG key (jax.random.key(seed))")
        return None
    if key.ndim == 0:
        return jax.random.split(key, batch)
    if key.shape != (batch,):
        raise InputError(f"key: need one PRNG key or one per prompt ({batch}), got shape {key.shape}")
    return key


def stop_rows(stop_tokens: Any, batch: int) -> list[Sequence[int]] | None:
    """Per-prompt stop lists, or None when ``stop_tokens`` is shared (or the default)."""
    rows = None if stop_tokens is None else list(stop_tokens)
    if not rows or not isinstance(rows[0], (list, tuple, np.ndarray)):
        return None
    if len(rows) != batch:
        raise InputError(f"stop_tokens: got {len(rows)} rows for a batch of {batch}")
    return rows
