"""Continuous batching with a lambda per slot: the engine that ``dj.serve``, sweeps, route-eval and
``dami-jax serve`` run on.

A fixed number of slots decode together, each on its own request: prompt, lambda, sampling, PRNG
key, stop ids and token budget. When a request finishes, its slot takes the next waiting one: its
prompt is prefilled into that slot's cache row (at most ``prefill_chunk`` prompt tokens per engine
step, so a long prompt never stalls the other slots for its whole length) and it joins the next
decode step. The pieces:

- :mod:`~dami_jax.engine.requests`: requests, checked before they can take a slot; events, results;
- :mod:`~dami_jax.engine.scheduler`: plain Python: queue, admission, slot table, prefill budget,
  the plan of each step (its policies are documented there);
- :mod:`~dami_jax.engine.runtime`: the device state, dispatch, warm-up;
- :mod:`~dami_jax.engine.cache`: the per-slot cache backend (a decode step reads only live tokens);
- :mod:`~dami_jax.engine.memory`: slots and tokens per slot from the free memory.

Lambda policy (measured in ``scripts/bench_engine.py``, docs/results.md): prefill runs on a
materialized theta(lambda) from a small :class:`~dami_jax.engine.thetas.ThetaCache`; a decode call
in which every busy slot shares one lambda runs on that theta (one model's reads and FLOPs), and a
call with mixed lambdas runs every weight op on both endpoints, mixed per row
(:mod:`dami_jax.models.rowmix`: twice the reads and FLOPs, but no model per lambda).

The host never waits for the device between steps: :meth:`Engine.step` dispatches its calls, then
reads back the previous step's tokens (so events come one step late).

Use it from a notebook::

    engine = Engine(pair, slots=8)
    ids = [engine.submit(prompt, lam=lam, max_new_tokens=256) for prompt, lam in zip(prompts, lambdas)]
    for result in engine.results():      # as they finish
        print(result.id, result.finish_reason, len(result.tokens))
    for event in engine.stream():        # or token by token
        print(event.id, event.tokens)
"""

from __future__ import annotations

import itertools
import time
from typing import Iterator, Sequence

import jax
from jax.sharding import Mesh

from dami_jax.dami.pair import ModelPair
from dami_jax.decoding.cache import CacheConfig, DenseCacheConfig
from dami_jax.decoding.sampling import GREEDY, Sampling
from dami_jax.engine.cache import RowLayout, resolve_kernel
from dami_jax.engine.memory import size_engine
from dami_jax.engine.placement import mesh_free_memory, mesh_of, pair_on_mesh
from dami_jax.engine.requests import RequestLimits, Result, TokenEvent
from dami_jax.engine.runtime import EngineStats, Pending, Runtime
from dami_jax.engine.scheduler import ADMISSIONS, MIN_PACK, Scheduler
from dami_jax.engine.tailorkv_slots import tailorkv_slot_bytes
from dami_jax.errors import InputError
from dami_jax.models.params import Params
from dami_jax.tailorkv.cache import TailorKVConfig
from dami_jax.tailorkv.prompt_store import prompt_capacity

__all__ = ["Engine", "EngineStats", "Result", "TokenEvent"]

THETA_CACHE = 2  # interpolated thetas an engine keeps by default


def tree_bytes(params: Params) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(params))


class Engine:
    """Continuous batching over ``slots`` cache rows of ``max_len`` tokens each.

    ``pair``: the two endpoints; ``lam`` per request picks theta(lam) between them.
    ``slots``, ``max_len`` (prompt + generated tokens per request): what is not given is picked
    from the free memory (:func:`~dami_jax.engine.memory.size_engine`: 8 slots, and as many tokens
    as fit, up to the model's context); a configuration that cannot fit is refused, naming the
    numbers. ``sizing.describe()`` says what was picked.
    ``steps_per_call``: decode steps per dispatch (fewer when requests wait and a slot's budget
    ends sooner).
    ``prefill_chunk``: prompt tokens prefilled per engine step (a power of two >= 32).
    ``theta_cache``: interpolated thetas kept (the endpoints are free).
    ``admission``: "fifo", "group" or "lambda" (:mod:`~dami_jax.engine.scheduler`).
    ``max_stop_tokens``: stop ids a request may give.
    ``profile``: wait for the device after each call, so that ``stats.prefill_s`` and
    ``stats.decode_s`` split the time (otherwise they stay 0).
    ``cache``: ``dj.DenseCacheConfig()`` (each slot a full-precision row) or a ``dj.TailorKVConfig``
    (each slot a TailorKV row, :mod:`~dami_jax.engine.tailorkv_slots`: 1/2-bit KV in the quantized
    layers, prompts in host memory for the sparse ones; its ``quantized_layers`` should be the
    model's layer profile, as for ``dj.generate``).
    ``max_new_tokens``: the most tokens a request may generate (default: all its context leaves);
    with TailorKV it sizes each slot's device store of generated tokens, so set it when prompts
    are long and answers short.
    ``layout``: how the XLA path reads a row (:class:`~dami_jax.engine.cache.RowLayout`);
    ``kernel``: what computes a decode step's attention (:func:`~dami_jax.engine.cache.resolve_kernel`:
    ``"auto"`` is the Pallas kernel on a GPU, XLA elsewhere).
    ``mesh``: a device mesh with a ``"tp"`` axis (``dj.make_mesh()``; default: the mesh the pair
    was loaded onto, if any): the pair tensor-parallel on it, the KV cache split over KV heads, the
    steps compiled once with their layouts pinned (:mod:`~dami_jax.engine.placement`); slot
    sizing reads every device's memory. TailorKV slots split the same way, their prompt stores
    in the host memory beside each device's heads. On a mesh over several processes
    (``jax.distributed``), every process builds the same engine and makes the same calls: each
    gives it the same requests (``dj.serve`` called by all), or process 0 takes them and the others
    follow it (:mod:`~dami_jax.engine.lockstep`).
    """

    def __init__(
        self,
        pair: ModelPair,
        *,
        slots: int | None = None,
        max_len: int | None = None,
        steps_per_call: int = 4,
        prefill_chunk: int = 256,
        theta_cache: int = THETA_CACHE,
        admission: str = "fifo",
        max_stop_tokens: int = 8,
        extrapolate: bool = False,
        profile: bool = False,
        cache: CacheConfig = DenseCacheConfig(),
        max_new_tokens: int | None = None,
        layout: RowLayout = RowLayout(),
        kernel: str = "auto",
        mesh: Mesh | None = None,
    ):
        if not isinstance(cache, (DenseCacheConfig, TailorKVConfig)):
            raise InputError(f"cache: the engine takes dj.DenseCacheConfig() or a dj.TailorKVConfig, got {type(cache).__name__}")
        mesh = mesh or mesh_of(pair)
        if mesh is not None:
            try:
                pair = pair_on_mesh(pair, mesh)
            except ValueError as error:
                raise InputError(str(error)) from None
        if isinstance(cache, TailorKVConfig):
            try:
                cache.validate(pair.cfg)
            except ValueError as error:
                raise InputError(f"cache: {error}") from None
        given = {"slots": (slots, 1), "max_len": (max_len, 2), "max_new_tokens": (max_new_tokens, 1)}
        for name, (value, low) in {**given, "steps_per_call": (steps_per_call, 1), "prefill_chunk": (prefill_chunk, MIN_PACK),
                                   "max_stop_tokens": (max_stop_tokens, 1), "theta_cache": (theta_cache, 0)}.items():  # fmt: skip
            if (value is not None or name not in given) and (not isinstance(value, int) or value < low):
                raise InputError(f"{name}: must be an integer >= {low}, got {value!r}")
        if prefill_chunk & (prefill_chunk - 1):
            raise InputError(f"prefill_chunk: must be a power of two, got {prefill_chunk}")
        if admission not in ADMISSIONS:
            raise InputError(f"admission: must be one of {ADMISSIONS}, got {admission!r}")
        try:
            kernel = resolve_kernel(kernel, pair.cfg)
        except ValueError as error:
            raise InputError(f"kernel: {error}") from None
        cfg = pair.cfg
        itemsize = jax.tree.leaves(pair.instruct)[0].dtype.itemsize
        dtype = jax.tree.leaves(pair.instruct)[0].dtype
        slot_bytes = tailorkv_slot_bytes(cfg, cache, max_new_tokens, dtype) if isinstance(cache, TailorKVConfig) else None
        self.sizing = size_engine(cfg, itemsize, theta_cache * tree_bytes(pair.instruct), slots, max_len, layout,
                                  slot_bytes=slot_bytes, free=None if mesh is None else mesh_free_memory(cfg, mesh))  # fmt: skip
        self.pair, self.cfg, self.slots, self.cache = pair, cfg, self.sizing.slots, cache
        self.context = min(self.sizing.max_len, cfg.max_position_embeddings)  # prompt + generated tokens per request
        if max_new_tokens is not None and max_new_tokens >= self.context:
            raise InputError(f"max_new_tokens: {max_new_tokens} leaves no room for a prompt in the engine's context of "
                             f"{self.context} tokens per request")  # fmt: skip
        if isinstance(cache, TailorKVConfig) and cache.top_k > prompt_capacity(self.context, cache.residual):
            raise InputError(f"cache: TailorKV's top-k of {cache.top_k} tokens is more than a slot's prompt store holds "
                             f"({prompt_capacity(self.context, cache.residual)} tokens for a context of {self.context}): lower the "
                             "budget, raise max_len, or use the dense cache")  # fmt: skip
        self.limits = RequestLimits(cfg, self.context, max_stop_tokens, extrapolate, max_new_tokens)
        self.scheduler = Scheduler(self.slots, prefill_chunk=prefill_chunk, steps_per_call=steps_per_call, admission=admission)
        self.runtime = Runtime(pair, slots=self.slots, max_len=self.context, steps_per_call=steps_per_call,
                               prefill_chunk=prefill_chunk, max_stop_tokens=max_stop_tokens, theta_cache=theta_cache,
                               extrapolate=extrapolate, layout=layout, kernel=kernel, cache=cache,
                               max_new_tokens=max_new_tokens, profile=profile, mesh=mesh)  # fmt: skip
        self._in_flight: list[Pending] = []
        self._ids = itertools.count()
        self._born = time.perf_counter()

    @property
    def max_new_tokens(self) -> int:
        """The most tokens one request may generate."""
        return self.limits.max_new_tokens or self.context - 1

    @property
    def kv_bytes_per_slot(self) -> tuple[int, int]:
        """(device, host) bytes of KV cache one slot holds."""
        return self.sizing.kv_bytes // self.slots, self.sizing.host_bytes // self.slots

    @property
    def stats(self) -> EngineStats:
        return self.runtime.stats

    def warmup(self) -> float:
        """Compile every shape the engine can run (each rows bucket of decode, plain and mixed;
        each packed prefill width and later pieces; the interpolations), so that no request ever
        waits for a compilation. Returns the seconds it took."""
        started = time.perf_counter()
        self.runtime.warmup(self.scheduler.row_buckets, self.scheduler.pack_widths)
        self.limits.check(-1, [0], 0.0, 1, Sampling(temperature=1.0), jax.random.key(0), None)  # key handling
        return time.perf_counter() - started

    # ------------------------------------------------------------------ requests

    def submit(
        self,
        prompt: Sequence[int],
        *,
        lam: float = 0.0,
        max_new_tokens: int = 128,
        sampling: Sampling = GREEDY,
        key: jax.Array | None = None,
        stop_tokens: Sequence[int] | None = None,
    ) -> int:
        """Queue a request (rendered prompt token ids) on theta(lam); returns its id. Everything is
        checked here, before it can take a slot: a bad request raises :class:`InputError` naming
        the argument and leaves every other request as it was. ``stop_tokens`` defaults to the
        pair's EOS ids (``[]``: never stop early); ``key`` is required when sampling."""
        request = self.limits.check(next(self._ids), prompt, lam, max_new_tokens, sampling, key, stop_tokens)
        self.scheduler.submit(request)
        return request.id

    def cancel(self, request_id: int) -> Result | None:
        """Drop a waiting or running request (its slot is free for the next step); returns its
        partial result, or None when it is not here (unknown or already finished)."""
        return self.scheduler.cancel(request_id)

    @property
    def idle(self) -> bool:
        """Nothing waiting, running, or on its way back from the device."""
        return self.scheduler.idle and not self._in_flight

    @property
    def waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def busy_slots(self) -> int:
        return self.scheduler.busy_slots

    # ------------------------------------------------------------------ the loop

    def step(self) -> list[TokenEvent]:
        """Dispatch this step (admissions, up to ``prefill_chunk`` prompt tokens, one decode call for
        the busy slots, those just prefilled included), then read back the previous step's tokens
        while the device computes this one. Returns those tokens' events, request by request."""
        plan = self.scheduler.plan()
        dispatched = self.runtime.dispatch(plan)
        if plan.decode is not None:
            self.stats.timeline.append((time.perf_counter() - self._born, len(plan.decode.decoding), plan.decode.steps))
        events = self._collect(self._in_flight)
        self._in_flight = dispatched
        return events

    def _collect(self, pending: list[Pending]) -> list[TokenEvent]:
        events = []
        for call, arrays in self.runtime.read(pending):
            for index, running in call.owners:
                if call.first:
                    tokens, logprobs = [int(arrays[0][index])], [float(arrays[1][index])]
                else:
                    emitted = arrays[2][:, index]
                    tokens, logprobs = arrays[0][emitted, index].tolist(), arrays[1][emitted, index].tolist()
                    self.stats.emitted_tokens += len(tokens)
                event = self.scheduler.deliver(running, tokens, logprobs)
                if event is not None:
                    events.append(event)
        return events

    def stream(self) -> Iterator[TokenEvent]:
        """Step until idle, yielding every request's tokens as they come (and its result last)."""
        while not self.idle:
            yield from self.step()

    def results(self) -> Iterator[Result]:
        """Step until idle, yielding each request's result as it finishes."""
        for finished in self.result_batches():
            yield from finished

    def result_batches(self) -> Iterator[list[Result]]:
        """Step until idle, yielding the results that finished in each step (for callers that
        write results in batches)."""
        while not self.idle:
            finished = [event.result for event in self.step() if event.result is not None]
            if finished:
                yield finished

    def run(self) -> list[Result]:
        """Every queued request's result, in submission order."""
        return sorted(self.results(), key=lambda r: r.id)
