"""The engine's runtime: owns the device state and the thetas, turns the scheduler's plans into
jitted calls, and compiles the whole bounded set of shapes up front.

A dispatch returns at once (JAX dispatches asynchronously): what it returns holds the calls'
outputs as device arrays, read back later (:meth:`Runtime.read`), after the next step has been
dispatched, so the device never waits for the host to plan. The state is donated to every call
and replaced by its output: nothing reads a donated buffer.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dami_jax.dami.pair import ModelPair
from dami_jax.decoding.sampling import GREEDY, NO_TOP_K
from dami_jax.decoding.cache import CacheConfig
from dami_jax.engine.cache import RowLayout, SlotKVCache
from dami_jax.engine.requests import Request
from dami_jax.engine.scheduler import DecodePlan, PackPlan, PiecePlan, Plan, Running
from dami_jax.engine.placement import state_shardings, store_sharding
from dami_jax.engine.steps import Pack, Piece, Settings, SlotState, Starts, decode, jitted_steps, prefill
from dami_jax.engine.tailorkv_slots import SlotTailorKVCache
from dami_jax.models.sharding import auto_axes
from dami_jax.engine.thetas import ThetaCache
from dami_jax.tailorkv.cache import TailorKVConfig

NO_STOP = -1


@dataclasses.dataclass(frozen=True)
class Pending:
    """One dispatched call's outputs, not read back yet. ``first``: prefill, (row, request) for
    each prompt whose first token it picks, arrays (tokens, log-probs) [n]; otherwise a decode:
    the requests decoding, arrays (tokens, log-probs, emitted) [steps, rows]."""

    first: bool
    owners: tuple[tuple[int, Running], ...]
    arrays: tuple[jax.Array, ...]


@dataclasses.dataclass
class EngineStats:
    """Counters since the engine was built; ``timeline`` has one (seconds since start, busy
    slots, steps) entry per decode call, for occupancy plots."""

    slots: int
    decode_calls: int = 0
    decode_steps: int = 0
    mixed_steps: int = 0  # steps that ran on both endpoints (mixed lambdas)
    prefill_calls: int = 0
    prefill_pieces: int = 0
    prefill_tokens: int = 0  # real prompt tokens prefilled
    emitted_tokens: int = 0  # tokens that went to a request (slot-steps that carried a real token)
    prefill_s: float = 0.0  # measured with profile=True only
    decode_s: float = 0.0
    interpolations: int = 0
    interpolation_s: float = 0.0
    timeline: list[tuple[float, int, int]] = dataclasses.field(default_factory=list)

    @property
    def occupancy(self) -> float:
        """Share of decode slot-steps that produced a request's token."""
        return self.emitted_tokens / max(1, self.decode_steps * self.slots)


def _settings(requests: list[Request | None], stop_width: int) -> Settings:
    """Host arrays of per-request settings, one row per entry (None: a padding row)."""
    filler = next(r for r in requests if r is not None)
    rows = [r or filler for r in requests]
    stop = np.full((len(rows), stop_width), NO_STOP, np.int32)
    for i, r in enumerate(rows):
        stop[i, : len(r.stop_tokens)] = r.stop_tokens

    def column(values, dtype) -> np.ndarray:
        return np.asarray(list(values), dtype)

    return Settings(
        key_data=np.stack([r.key_data for r in rows]), lam=column((r.lam for r in rows), np.float32),
        temperature=column((r.sampling.temperature for r in rows), np.float32),
        top_k=column((r.sampling.top_k or NO_TOP_K for r in rows), np.int32),
        top_p=column((1.0 if r.sampling.top_p is None else r.sampling.top_p for r in rows), np.float32),
        stop=stop, max_new=column((r.max_new_tokens for r in rows), np.int32),
    )  # fmt: skip


class Runtime:
    """Device state for ``slots`` rows of ``max_len`` tokens, and the dispatch of plans.

    ``profile``: wait for the device after each call, so that the stats split prefill and decode
    time (otherwise the host prepares the next call while the device computes)."""

    def __init__(self, pair: ModelPair, *, slots: int, max_len: int, steps_per_call: int, prefill_chunk: int,
                 max_stop_tokens: int, theta_cache: int, extrapolate: bool, layout: RowLayout, kernel: str = "xla",
                 cache: CacheConfig | None = None, max_new_tokens: int | None = None, profile: bool = False,
                 mesh: Mesh | None = None):  # fmt: skip
        self.pair, self.cfg, self.profile = pair, pair.cfg, profile
        self.steps_per_call, self.prefill_chunk, self.stop_width = steps_per_call, prefill_chunk, max_stop_tokens
        dtype = jax.tree.leaves(pair.instruct)[0].dtype
        if isinstance(cache, TailorKVConfig):
            rows = SlotTailorKVCache.create(pair.cfg, cache, slots, max_len, max_new_tokens or max_len - 1, dtype,
                                            None if mesh is None else store_sharding(pair.cfg, mesh))  # fmt: skip
        else:
            rows = SlotKVCache.create(pair.cfg, slots, max_len, dtype, layout, kernel)
        # Committed to their shardings (memory kinds included) from the start: every call, warm-up
        # first, then sees the argument shardings that the calls' outputs carry, so none recompiles.
        state = SlotState.create(rows, max_stop_tokens)
        if mesh is None:
            self.state = jax.tree.map(lambda x: jax.device_put(x, x.sharding), state)
            self.prefill_step, self.decode_step = prefill, decode
        else:
            shardings = state_shardings(state, pair.cfg, mesh)
            self.state = jax.device_put(state, shardings)
            self.prefill_step, self.decode_step = jitted_steps(shardings, NamedSharding(auto_axes(mesh), P()))
        self.thetas = ThetaCache(pair, theta_cache, extrapolate)
        self.stats = EngineStats(slots)

    @property
    def slots(self) -> int:
        return self.state.cache.slots

    def dispatch(self, plan: Plan) -> list[Pending]:
        """Dispatch every call of ``plan`` (packs, later pieces, then the decode call)."""
        pending = [self._pack(p) for p in plan.packs] + [self._piece(p) for p in plan.pieces]
        if plan.decode is not None:
            pending.append(self._decode(plan.decode))
        return pending

    @staticmethod
    def read(pending: list[Pending]) -> list[tuple[Pending, tuple[np.ndarray, ...]]]:
        """The calls' outputs as host arrays (one wait, for all of them)."""
        arrays = jax.device_get([p.arrays for p in pending])
        return list(zip(pending, arrays))

    # ------------------------------------------------------------------ prefill

    def _pack(self, plan: PackPlan) -> Pending:
        tokens = np.full(plan.width, self.cfg.pad_token_id, np.int32)
        slot = np.full(plan.width, self.slots, np.int32)
        position = np.zeros(plan.width, np.int32)
        segment = np.full(plan.width, -1, np.int32)
        last, at = [], 0
        for i, (running, real) in enumerate(plan.entries):
            tokens[at : at + real] = running.request.prompt[:real]
            slot[at : at + real], position[at : at + real], segment[at : at + real] = running.slot, np.arange(real), i
            last.append(at + real - 1)
            at += real
        entries = [(running, 0, real) for running, real in plan.entries]
        return self._prefill(plan.lam, Pack(tokens, slot, position, segment), entries, last, rows=self.slots)

    def _piece(self, plan: PiecePlan) -> Pending:
        prompt = plan.running.request.prompt
        tokens = np.full(self.prefill_chunk, self.cfg.pad_token_id, np.int32)
        tokens[: plan.real] = prompt[plan.offset : plan.offset + plan.real]
        piece = Piece(tokens, np.int32(plan.running.slot), np.int32(plan.offset), np.int32(plan.real))
        return self._prefill(plan.running.request.lam, piece, [(plan.running, plan.offset, plan.real)], [plan.real - 1], rows=1)

    def _prefill(self, lam: float, piece: Pack | Piece, entries: list[tuple[Running, int, int]], last: list[int],
                 rows: int) -> Pending:  # fmt: skip
        """One prefill call of ``entries`` (request, offset, real tokens), padded to ``rows`` prompts."""
        pad = rows - len(entries)
        ends = [offset + real == len(running.request.prompt) for running, offset, real in entries]
        starts = Starts(
            slot=np.asarray([running.slot for running, _, _ in entries] + [self.slots] * pad, np.int32),
            last=np.asarray(last + [0] * pad, np.int32), starts=np.asarray(ends + [False] * pad),
            settings=_settings([running.request for running, _, _ in entries] + [None] * pad, self.stop_width),
        )  # fmt: skip
        clock = time.perf_counter()
        self.state, tokens, logprobs = self.prefill_step(self._theta(lam), self.state, piece, starts, cfg=self.cfg)
        if self.profile:
            jax.block_until_ready(tokens)
            self.stats.prefill_s += time.perf_counter() - clock
        self.stats.prefill_calls += 1
        self.stats.prefill_pieces += len(entries)
        self.stats.prefill_tokens += sum(real for _, _, real in entries)
        owners = tuple((row, running) for row, ((running, _, _), end) in enumerate(zip(entries, ends)) if end)
        return Pending(True, owners, (tokens, logprobs))

    # ------------------------------------------------------------------ decode

    def _decode(self, plan: DecodePlan) -> Pending:
        if plan.lam is None:
            params, other = self.pair.instruct, self.pair.thinking
            self.stats.mixed_steps += plan.steps
        else:
            params, other = self._theta(plan.lam), None
        clock = time.perf_counter()
        self.state, *outputs = self.decode_step(params, other, self.state, np.asarray(plan.live), np.int32(plan.steps),
                                      cfg=self.cfg, rows=plan.rows, max_steps=self.steps_per_call)  # fmt: skip
        if self.profile:
            jax.block_until_ready(outputs)
            self.stats.decode_s += time.perf_counter() - clock
        self.stats.decode_calls += 1
        self.stats.decode_steps += plan.steps
        return Pending(False, tuple((r.slot, r) for r in plan.decoding), tuple(outputs))

    def _theta(self, lam: float):
        theta = self.thetas.get(lam)
        self.stats.interpolations, self.stats.interpolation_s = self.thetas.interpolations, self.thetas.interpolation_s
        return theta

    # ------------------------------------------------------------------ warm-up

    def warmup(self, row_buckets: tuple[int, ...], pack_widths: tuple[int, ...]) -> None:
        """Compile every shape the engine can dispatch, by dispatching each on inputs that change
        nothing (no live slot, no real token): decode per rows bucket, plain and mixed; prefill per
        packed width and for later pieces; and the interpolations of the theta cache."""
        idle = np.zeros(self.slots, bool)
        for rows in row_buckets:
            for other in (None, self.pair.thinking):
                self.state, *_ = self.decode_step(self.pair.instruct, other, self.state, idle, np.int32(0), cfg=self.cfg, rows=rows,
                                        max_steps=self.steps_per_call)  # fmt: skip
        for width in pack_widths:
            pack = Pack(np.zeros(width, np.int32), np.full(width, self.slots, np.int32), np.zeros(width, np.int32),
                        np.full(width, -1, np.int32))  # fmt: skip
            self._warm_prefill(pack, self.slots)
        self._warm_prefill(Piece(np.zeros(self.prefill_chunk, np.int32), np.int32(0), np.int32(0), np.int32(0)), 1)
        self.thetas.warmup()
        jax.block_until_ready(self.state)

    def _warm_prefill(self, piece: Pack | Piece, rows: int) -> None:
        nobody = Request(-1, (0,), 0.0, 1, GREEDY, np.asarray(jax.random.key_data(jax.random.key(0))), (), 0.0)
        starts = Starts(slot=np.full(rows, self.slots, np.int32), last=np.zeros(rows, np.int32), starts=np.zeros(rows, bool),
                        settings=_settings([nobody] * rows, self.stop_width))  # fmt: skip
        self.state, *_ = self.prefill_step(self.pair.instruct, self.state, piece, starts, cfg=self.cfg)
