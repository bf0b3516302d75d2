"""Continuous batching with a lambda per slot: the engine's host side.

A fixed number of slots decode together, each on its own request: prompt, lambda, sampling, PRNG
key, stop ids and token budget. When a request finishes, its slot takes the next waiting one: its
prompt is prefilled into that slot's cache row (in pieces of at most ``prefill_chunk`` tokens,
one budget of prefill per engine step, so a long prompt never stalls the other slots for its
whole length) and it joins the next decode step.

Lambda policy (measured in ``scripts/bench_engine.py``, docs/results.md): prefill runs on a
materialized theta(lambda) from a small :class:`~dami_jax.engine.thetas.ThetaCache`; a decode step
in which every busy slot shares one lambda runs on that theta (one model's reads and FLOPs), and
a step with mixed lambdas runs every weight op on both endpoints, mixed per row
(:mod:`dami_jax.models.rowmix`: twice the reads and FLOPs, but no model per lambda).
``admission="group"`` fills a free slot with the first waiting request whose lambda the busy
slots share (looking ``GROUP_WINDOW`` requests ahead, and passing over the head of the queue at
most ``GROUP_WINDOW`` times), so that more steps take the single-model path; ``admission="lambda"``
walks the waiting requests in lambda order (``dj.serve`` and route-eval, whose batches are known
in advance), so that the slots share one lambda but at its boundaries.

Use it from a notebook::

    engine = Engine(pair, slots=8)
    ids = [engine.submit(prompt, lam=lam, max_new_tokens=256) for prompt, lam in zip(prompts, lambdas)]
    for result in engine.results():      # as they finish
        print(result.id, result.finish_reason, len(result.tokens))
    for event in engine.stream():        # or token by token
        print(event.id, event.tokens)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections import deque
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dami_jax.dami.pair import ModelPair
from dami_jax.decoding.cache import CacheConfig, DenseCacheConfig
from dami_jax.decoding.generation import PROMPT_BUCKET
from dami_jax.decoding.sampling import GREEDY, NO_TOP_K, Sampling
from dami_jax.engine.steps import Pieces, SlotState, decode, prefill
from dami_jax.engine.thetas import ThetaCache
from dami_jax.errors import InputError

ADMISSIONS = ("fifo", "group", "lambda")
GROUP_WINDOW = 32  # how far down the queue admission="group" looks for a request of the busy lambda
NO_STOP = -1


@dataclasses.dataclass(frozen=True)
class Request:
    """A validated request, as the engine queues it."""

    id: int
    prompt: tuple[int, ...]
    lam: float
    max_new_tokens: int
    sampling: Sampling
    key_data: np.ndarray  # its PRNG key's data (jax.random.key_data); a fixed key when greedy without one
    stop_tokens: tuple[int, ...]
    submitted: float  # time.perf_counter() at submit


@dataclasses.dataclass(frozen=True)
class Result:
    """A finished request. ``finish_reason``: "stop" (a stop id, included in ``tokens``),
    "length" (``max_new_tokens`` reached) or "cancelled"."""

    id: int
    lam: float
    prompt_tokens: int
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    submitted: float  # perf_counter() timestamps
    first_token: float | None
    finished: float

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.submitted

    @property
    def latency(self) -> float:
        return self.finished - self.submitted


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """New tokens of one request since its last event; ``result`` is set when it finished."""

    id: int
    tokens: tuple[int, ...]
    result: Result | None = None


@dataclasses.dataclass
class EngineStats:
    """Counters since the engine was built; ``timeline`` has one (seconds since start, busy
    slots, steps) entry per decode call, for occupancy plots."""

    slots: int
    decode_calls: int = 0
    decode_steps: int = 0
    mixed_steps: int = 0  # steps that ran on both endpoints (mixed lambdas)
    emitted_tokens: int = 0  # tokens that went to a request (slot-steps that carried a real token)
    prefill_pieces: int = 0
    prefill_tokens: int = 0  # real prompt tokens prefilled
    prefill_s: float = 0.0  # measured with Engine(profile=True) only
    decode_s: float = 0.0
    interpolations: int = 0
    interpolation_s: float = 0.0
    timeline: list[tuple[float, int, int]] = dataclasses.field(default_factory=list)

    @property
    def occupancy(self) -> float:
        """Share of decode slot-steps that produced a request's token."""
        return self.emitted_tokens / max(1, self.decode_steps * self.slots)


@dataclasses.dataclass
class _Running:
    """A request in a slot: prefilling (``offset`` < prompt length) or decoding."""

    request: Request
    offset: int = 0  # prompt tokens prefilled
    generated: int = 0  # tokens generated on the device, some perhaps not read back yet
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    first_token: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.offset < len(self.request.prompt)


class Engine:
    """Continuous batching over ``slots`` rows of one cache of ``max_len`` tokens per row.

    ``pair``: the two endpoints; ``lam`` per request picks theta(lam) between them.
    ``max_len``: prompt + generated tokens per request (default: the model's
    max_position_embeddings); every row holds that many, so KV memory is
    slots x max_len x layers x 2 x kv_heads x head_dim x dtype bytes.
    ``steps_per_call``: decode steps per host round trip (fewer when a slot's budget ends sooner).
    ``prefill_chunk``: prompt tokens prefilled per engine step (and per piece).
    ``theta_cache``: interpolated thetas kept (the endpoints are free).
    ``admission``: "fifo"; "group" (prefer the busy slots' lambda); or "lambda" (walk the queue in
    lambda order, for batches known in advance). See the module docstring.
    ``max_stop_tokens``: stop ids a request may give.
    ``profile``: wait for the device after each prefill and decode call, so that
    ``stats.prefill_s`` and ``stats.decode_s`` split the time (otherwise they stay 0, and the host
    prepares the next call while the device computes).
    ``cache``: the engine runs on its own per-slot dense cache; a TailorKV cache is refused.
    """

    def __init__(
        self,
        pair: ModelPair,
        *,
        slots: int = 8,
        max_len: int | None = None,
        steps_per_call: int = 4,
        prefill_chunk: int = 256,
        theta_cache: int = 2,
        admission: str = "fifo",
        max_stop_tokens: int = 8,
        extrapolate: bool = False,
        profile: bool = False,
        cache: CacheConfig = DenseCacheConfig(),
    ):
        if not isinstance(cache, DenseCacheConfig):
            raise InputError(
                f"cache: the engine needs a cache whose rows each keep their own length (a slot is refilled "
                f"while the others decode); {type(cache).__name__} keeps one length for the whole batch (its "
                "quantized windows flush together), so it cannot take per-slot requests: use "
                "dj.generate(..., cache=...) for a static batch on it"
            )  # fmt: skip
        cfg = pair.cfg
        max_len = cfg.max_position_embeddings if max_len is None else max_len
        for name, value, low in (("slots", slots, 1), ("max_len", max_len, 2), ("steps_per_call", steps_per_call, 1),
                                 ("prefill_chunk", prefill_chunk, PROMPT_BUCKET), ("max_stop_tokens", max_stop_tokens, 1)):  # fmt: skip
            if not isinstance(value, int) or value < low:
                raise InputError(f"{name}: must be an integer >= {low}, got {value!r}")
        if prefill_chunk % PROMPT_BUCKET:
            raise InputError(f"prefill_chunk: must be a multiple of {PROMPT_BUCKET}, got {prefill_chunk}")
        if admission not in ADMISSIONS:
            raise InputError(f"admission: must be one of {ADMISSIONS}, got {admission!r}")
        self.pair, self.cfg = pair, cfg
        self.slots, self.steps_per_call, self.prefill_chunk, self.admission = slots, steps_per_call, prefill_chunk, admission
        self.extrapolate, self.profile = extrapolate, profile
        self.context = min(max_len, cfg.max_position_embeddings)  # prompt + generated tokens per request
        size = -(-max_len // PROMPT_BUCKET) * PROMPT_BUCKET  # a padded last prompt piece always fits its row
        dtype = jax.tree.leaves(pair.instruct)[0].dtype
        self._state = SlotState.create(cfg, slots, size, max_stop_tokens, dtype)
        self._thetas = ThetaCache(pair, theta_cache, extrapolate)
        self._running: list[_Running | None] = [None] * slots
        self._waiting: deque[Request] = deque()
        self._passed_over = 0  # admissions that went past the head of the queue (admission="group")
        self._ids = itertools.count()
        self._greedy_key = jax.random.key(0)  # what a greedy request without a key carries (never drawn from)
        self._born = time.perf_counter()
        self.stats = EngineStats(slots)

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
        request = self._validated(prompt, lam, max_new_tokens, sampling, key, stop_tokens)
        self._waiting.append(request)
        return request.id

    def _validated(self, prompt, lam, max_new_tokens, sampling, key, stop_tokens) -> Request:
        cfg = self.cfg
        try:
            prompt = tuple(int(t) for t in prompt)
        except (TypeError, ValueError):
            raise InputError(f"prompt: must be a sequence of token ids, got {type(prompt).__name__}") from None
        if not prompt:
            raise InputError("prompt: needs at least one token")
        outside = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if outside:
            raise InputError(f"prompt: token id {outside[0]} is outside the vocabulary [0, {cfg.vocab_size})")
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens: must be an integer >= 1, got {max_new_tokens!r}")
        if len(prompt) + max_new_tokens > self.context:
            raise InputError(f"max_new_tokens: the prompt's {len(prompt)} tokens + max_new_tokens={max_new_tokens} exceed "
                             f"the engine's context of {self.context} tokens per request")  # fmt: skip
        try:
            lam = float(lam)
        except (TypeError, ValueError):
            raise InputError(f"lam: must be a number, got {lam!r}") from None
        if not math.isfinite(lam) or (not self.extrapolate and not 0.0 <= lam <= 1.0):
            raise InputError(f"lam: {lam} is outside [0, 1]" + ("" if math.isfinite(lam) else " (not finite)"))
        if not isinstance(sampling, Sampling):
            raise InputError(f"sampling: must be a dj.Sampling, got {type(sampling).__name__}")
        if key is None:
            if not sampling.greedy:
                raise InputError("key: sampling with temperature > 0 needs an explicit PRNG key (jax.random.key(seed))")
            key = self._greedy_key
        elif not (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()):
            raise InputError(f"key: need one PRNG key (jax.random.key(seed)), got {key.dtype} {key.shape}")
        elif str(jax.random.key_impl(key)) != str(jax.random.key_impl(self._greedy_key)):
            raise InputError(f"key: a {jax.random.key_impl(key)} key; the engine carries {jax.random.key_impl(self._greedy_key)} keys")
        stop = cfg.eos_token_ids if stop_tokens is None else tuple(int(t) for t in stop_tokens)
        width = self._state.stop.shape[1]
        if len(stop) > width:
            raise InputError(f"stop_tokens: {len(stop)} ids, more than the engine's max_stop_tokens={width}")
        key_data = np.asarray(jax.random.key_data(key))
        return Request(next(self._ids), prompt, lam, int(max_new_tokens), sampling, key_data, tuple(stop), time.perf_counter())

    def cancel(self, request_id: int) -> Result | None:
        """Drop a waiting or running request (its slot is free for the next step); returns its
        partial result, or None when it is not here (unknown or already finished)."""
        for request in self._waiting:
            if request.id == request_id:
                self._waiting.remove(request)
                return self._result(_Running(request), "cancelled")
        for slot, running in enumerate(self._running):
            if running is not None and running.request.id == request_id:
                self._free(slot)
                return self._result(running, "cancelled")
        return None

    @property
    def idle(self) -> bool:
        """Nothing waiting and no slot busy."""
        return not self._waiting and all(r is None for r in self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def busy_slots(self) -> int:
        return sum(r is not None for r in self._running)

    # ------------------------------------------------------------------ the loop

    def step(self) -> list[TokenEvent]:
        """Admit waiting requests into free slots, prefill up to ``prefill_chunk`` prompt tokens,
        then run one decode call for the busy slots (those just prefilled included). Returns what
        happened, request by request. The device work is dispatched first and read back once."""
        self._admit()
        started = self._prefill()
        decoded = self._decode()
        started, decoded = jax.device_get((started, decoded))
        events = [event for group in started for event in self._started(*group)]
        if decoded is not None:
            events += self._decoded(*decoded)
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

    # ------------------------------------------------------------------ inside a step

    def _admit(self) -> None:
        for slot in range(self.slots):
            if self._running[slot] is None and self._waiting:
                self._running[slot] = _Running(self._next_request())

    def _next_request(self) -> Request:
        """The head of the queue. Under ``admission="group"``, the first of the next
        ``GROUP_WINDOW`` whose lambda the busy slots share, unless the head has already been
        passed over ``GROUP_WINDOW`` times (so nothing waits for ever). Under
        ``admission="lambda"``, the earliest request of the least waiting lambda: the slots walk
        the lambdas in order, as a batch known in advance allows (it ignores arrival order)."""
        if self.admission == "lambda":
            request = min(self._waiting, key=lambda r: (r.lam, r.id))
            self._waiting.remove(request)
            return request
        if self.admission == "group" and self._passed_over < GROUP_WINDOW:
            busy = {r.request.lam for r in self._running if r is not None}
            if len(busy) == 1 and self._waiting[0].lam not in busy:
                for request in itertools.islice(self._waiting, 1, GROUP_WINDOW):
                    if request.lam in busy:
                        self._waiting.remove(request)
                        self._passed_over += 1
                        return request
        self._passed_over = 0
        return self._waiting.popleft()

    def _prefill(self) -> list[tuple]:
        """Dispatch one piece of each prefilling prompt, oldest request first, within one budget
        of ``prefill_chunk`` tokens; the pieces of one lambda and one padded width run as one
        batch (padded to a power of two rows), first pieces apart from later ones. A piece that
        leaves part of its prompt for a later step ends on a ``PROMPT_BUCKET`` boundary, so that
        every piece, padded, fits its row. Returns, per batch, (the requests it started, with
        their rows; first tokens, log-probs, finished flags) for :meth:`_started`."""
        groups: dict[tuple[float, int, bool], list[tuple[int, _Running, int]]] = {}
        budget = self.prefill_chunk
        for _, slot in sorted((r.request.id, slot) for slot, r in enumerate(self._running) if r is not None and r.prefilling):
            running = self._running[slot]
            remaining = len(running.request.prompt) - running.offset
            real = min(self.prefill_chunk, remaining, budget)
            if real < remaining:
                real -= real % PROMPT_BUCKET
            if real == 0:
                break
            width = -(-real // PROMPT_BUCKET) * PROMPT_BUCKET
            groups.setdefault((running.request.lam, width, running.offset == 0), []).append((slot, running, real))
            budget -= real
        started, clock = [], time.perf_counter()
        for (lam, width, fresh), group in groups.items():
            pieces = self._pieces(group, width)
            self._state, *first = prefill(self._theta(lam), self._state, pieces, cfg=self.cfg, fresh=fresh)
            self.stats.prefill_pieces += len(group)
            self.stats.prefill_tokens += sum(real for _, _, real in group)
            done = []
            for row, (slot, running, real) in enumerate(group):
                running.offset += real
                if not running.prefilling:
                    running.generated = 1
                    done.append((row, slot, running))
            started.append((done, *first))
        if groups and self.profile:
            jax.block_until_ready(self._state.cache.length)
            self.stats.prefill_s += time.perf_counter() - clock
        return started

    def _pieces(self, group: list[tuple[int, _Running, int]], width: int) -> Pieces:
        """The host arrays of one prefill batch (padding rows copy the first row, slot past the last)."""
        rows = 1 << (len(group) - 1).bit_length()
        entries = group + [(self.slots, group[0][1], group[0][2])] * (rows - len(group))
        tokens = np.full((rows, width), self.cfg.pad_token_id, np.int32)
        stop = np.full((rows, self._state.stop.shape[1]), NO_STOP, np.int32)
        for i, (_, running, real) in enumerate(entries):
            tokens[i, :real] = running.request.prompt[running.offset : running.offset + real]
            stop[i, : len(running.request.stop_tokens)] = running.request.stop_tokens
        requests = [running.request for _, running, _ in entries]

        def column(values, dtype) -> np.ndarray:
            return np.asarray(list(values), dtype)

        return Pieces(
            slot=column((slot for slot, _, _ in entries), np.int32), tokens=tokens,
            offset=column((running.offset for _, running, _ in entries), np.int32),
            real=column((real for _, _, real in entries), np.int32),
            starts=column((running.offset + real == len(running.request.prompt) for _, running, real in entries), bool),
            key_data=np.stack([r.key_data for r in requests]), lam=column((r.lam for r in requests), np.float32),
            temperature=column((r.sampling.temperature for r in requests), np.float32),
            top_k=column((r.sampling.top_k or NO_TOP_K for r in requests), np.int32),
            top_p=column((1.0 if r.sampling.top_p is None else r.sampling.top_p for r in requests), np.float32),
            stop=stop, max_new=column((r.max_new_tokens for r in requests), np.int32),
        )  # fmt: skip

    def _theta(self, lam: float):
        theta = self._thetas.get(lam)
        self.stats.interpolations, self.stats.interpolation_s = self._thetas.interpolations, self._thetas.interpolation_s
        return theta

    def _started(self, done: list[tuple[int, int, _Running]], tokens: np.ndarray, logprobs: np.ndarray, finished: np.ndarray) -> list[TokenEvent]:
        """Events for requests whose first token came back (``done``: their row, slot, request)."""
        now, events = time.perf_counter(), []
        for row, slot, running in done:
            token = int(tokens[row])
            running.tokens.append(token)
            running.logprobs.append(float(logprobs[row]))
            running.first_token = now
            result = None
            if finished[row]:
                self._running[slot] = None
                result = self._result(running, self._reason(running))
            events.append(TokenEvent(running.request.id, (token,), result))
        return events

    def _decode(self) -> tuple | None:
        """Dispatch one decode call of up to ``steps_per_call`` steps (a power of two: few
        compilations; fewer when a busy slot's budget ends sooner) for the slots past prefill.
        Returns what :meth:`_decoded` needs, or None when no slot decodes."""
        decoding = [(slot, r) for slot, r in enumerate(self._running)
                    if r is not None and not r.prefilling and r.generated < r.request.max_new_tokens]  # fmt: skip
        if not decoding:
            return None
        left = min(r.request.max_new_tokens - r.generated for _, r in decoding)
        steps = 1 << (min(self.steps_per_call, left).bit_length() - 1)
        lambdas = {r.request.lam for _, r in decoding}
        clock = time.perf_counter()
        if len(lambdas) == 1:
            params, other = self._theta(next(iter(lambdas))), None
        else:
            params, other = self.pair.instruct, self.pair.thinking
            self.stats.mixed_steps += steps
        self._state, tokens, logprobs, emitted = decode(params, other, self._state, cfg=self.cfg, steps=steps)
        if self.profile:
            jax.block_until_ready(tokens)
            self.stats.decode_s += time.perf_counter() - clock
        self.stats.decode_calls += 1
        self.stats.decode_steps += steps
        self.stats.timeline.append((clock - self._born, len(decoding), steps))
        return [slot for slot, _ in decoding], tokens, logprobs, emitted, self._state.active

    def _decoded(self, slots: list[int], tokens: np.ndarray, logprobs: np.ndarray, emitted: np.ndarray, active: np.ndarray) -> list[TokenEvent]:
        """Events for the tokens one decode call produced (tokens, log-probs, emitted [steps, B])."""
        self.stats.emitted_tokens += int(emitted.sum())
        events = []
        for slot in slots:
            running = self._running[slot]
            if running is None:  # finished at its first token, in the same step
                continue
            mine = emitted[:, slot]
            new = tokens[mine, slot].tolist()
            running.tokens += new
            running.logprobs += logprobs[mine, slot].tolist()
            running.generated += len(new)
            if not active[slot]:
                self._running[slot] = None
                events.append(TokenEvent(running.request.id, tuple(new), self._result(running, self._reason(running))))
            elif new:
                events.append(TokenEvent(running.request.id, tuple(new)))
        return events

    def _free(self, slot: int) -> None:
        self._running[slot] = None
        self._state = self._state.replace(active=self._state.active.at[slot].set(False))

    @staticmethod
    def _reason(running: _Running) -> str:
        return "stop" if running.tokens and running.tokens[-1] in running.request.stop_tokens else "length"

    def _result(self, running: _Running, reason: str) -> Result:
        request = running.request
        return Result(request.id, request.lam, len(request.prompt), running.tokens, running.logprobs, reason,
                      request.submitted, running.first_token, time.perf_counter())  # fmt: skip
