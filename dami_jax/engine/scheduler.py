"""The engine's scheduler: plain Python, no JAX. It owns the queue and the slot table, decides what
each engine step dispatches (admissions, prefill pieces within a token budget, one decode call),
and turns what the device sends back into token events and results.

Its knowledge of the device runs one step behind (the engine reads a step's tokens back after
dispatching the next one), so it plans with what it knows for sure: how many prompt tokens it
dispatched, and an upper bound on each request's generated tokens (``dispatched``: what the
device will have made once every dispatched call has run, unless a stop id ends it sooner). A
request whose budget the dispatched steps exhaust gives its slot up at once; one that stops on a
stop id gives it up when that token comes back.

Policies (measured in ``scripts/bench_engine.py``, docs/results.md):
- a request takes the lowest free slot, and a decode call runs slots 0..R-1 with R the smallest
  rows bucket (powers of two, then all slots) that holds every decoding slot: on 2 CPU cores a
  step of 8 rows costs about twice a step of 1, so a lone request must not pay for idle slots;
- a step's prefill takes at most ``prefill_chunk`` prompt tokens, oldest request first: new
  prompts' first pieces are packed into one sequence per lambda (a power-of-two width), a long
  prompt's later pieces go one per call;
- a decode call runs ``steps_per_call`` steps, fewer when requests wait and a busy slot's budget
  ends sooner (so that its slot is handed over on time);
- ``admission``: "fifo"; "group" (fill a free slot with the first waiting request whose lambda
  the busy slots share, looking ``GROUP_WINDOW`` requests ahead and passing over the head of the
  queue at most ``GROUP_WINDOW`` times, so that more steps take the single-model path);
  "lambda" (walk the waiting requests in lambda order, for batches known in advance).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import deque

from dami_jax.engine.requests import Request, Result, TokenEvent, result_of

ADMISSIONS = ("fifo", "group", "lambda")
GROUP_WINDOW = 32  # how far down the queue admission="group" looks for a request of the busy lambda
MIN_PACK = 32  # the narrowest packed prefill


def buckets(limit: int, smallest: int = 1) -> tuple[int, ...]:
    """Powers of two from ``smallest`` below ``limit``, then ``limit``: the shapes a dimension
    bounded by ``limit`` is padded to (a bounded set of compilations)."""
    sizes = itertools.takewhile(lambda n: n < limit, (smallest << i for i in itertools.count()))
    return (*sizes, limit)


def bucket(n: int, sizes: tuple[int, ...]) -> int:
    return next(size for size in sizes if size >= n)


@dataclasses.dataclass(eq=False)
class Running:
    """A request that holds (or held) a slot."""

    request: Request
    slot: int
    offset: int = 0  # prompt tokens dispatched to prefill
    dispatched: int = 0  # generated tokens once every dispatched call has run (an upper bound)
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    first_token: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.offset < len(self.request.prompt)

    @property
    def budget_left(self) -> int:
        return self.request.max_new_tokens - self.dispatched


@dataclasses.dataclass(frozen=True)
class PackPlan:
    """First pieces of prompts of one lambda, packed into ``width`` tokens: (request, real tokens)."""

    lam: float
    width: int
    entries: tuple[tuple[Running, int], ...]


@dataclasses.dataclass(frozen=True)
class PiecePlan:
    """A later piece of one prompt: ``real`` tokens after ``offset``."""

    running: Running
    offset: int
    real: int


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """One decode call: ``steps`` steps of slots 0..rows-1 on theta(lam) (None: mixed per row)."""

    rows: int
    steps: int
    lam: float | None
    decoding: tuple[Running, ...]
    live: tuple[bool, ...]  # per slot: the host still serves it


@dataclasses.dataclass(frozen=True)
class Plan:
    packs: tuple[PackPlan, ...]
    pieces: tuple[PiecePlan, ...]
    decode: DecodePlan | None

    @property
    def empty(self) -> bool:
        return not (self.packs or self.pieces or self.decode)


class Scheduler:
    """Queue, slot table and the plan of every step, for ``slots`` slots."""

    def __init__(self, slots: int, *, prefill_chunk: int, steps_per_call: int, admission: str = "fifo"):
        self.slots, self.prefill_chunk, self.steps_per_call, self.admission = slots, prefill_chunk, steps_per_call, admission
        self.row_buckets = buckets(slots)
        self.pack_widths = buckets(prefill_chunk, min(MIN_PACK, prefill_chunk))
        self.waiting: deque[Request] = deque()
        self.table: list[Running | None] = [None] * slots
        self.finishing: dict[int, Running] = {}  # budget dispatched, tokens not all back yet
        self._passed_over = 0  # admissions that went past the head of the queue (admission="group")

    # ------------------------------------------------------------------ requests

    @property
    def busy_slots(self) -> int:
        return sum(r is not None for r in self.table)

    @property
    def idle(self) -> bool:
        """Nothing waiting, running or coming back."""
        return not self.waiting and not self.finishing and self.busy_slots == 0

    def submit(self, request: Request) -> None:
        self.waiting.append(request)

    def cancel(self, request_id: int) -> Result | None:
        """Drop a waiting, running or finishing request; its partial result, or None if unknown."""
        for request in self.waiting:
            if request.id == request_id:
                self.waiting.remove(request)
                return result_of(request, [], [], "cancelled", None)
        running = self.finishing.pop(request_id, None) or next(
            (r for r in self.table if r is not None and r.request.id == request_id), None
        )
        if running is None:
            return None
        self._release(running)
        return result_of(running.request, running.tokens, running.logprobs, "cancelled", running.first_token)

    # ------------------------------------------------------------------ planning

    def plan(self) -> Plan:
        """Admit, then plan this step's prefill and decode calls; the bookkeeping assumes the
        plan is dispatched."""
        self._admit()
        packs, pieces = self._plan_prefill()
        return Plan(packs, pieces, self._plan_decode())

    def _admit(self) -> None:
        for slot in range(self.slots):  # the lowest free slot first
            if self.table[slot] is None and self.waiting:
                self.table[slot] = Running(self._next_request(), slot)

    def _next_request(self) -> Request:
        if self.admission == "lambda":
            request = min(self.waiting, key=lambda r: (r.lam, r.id))
            self.waiting.remove(request)
            return request
        if self.admission == "group" and self._passed_over < GROUP_WINDOW:
            busy = {r.request.lam for r in self.table if r is not None}
            if len(busy) == 1 and self.waiting[0].lam not in busy:
                for request in itertools.islice(self.waiting, 1, GROUP_WINDOW):
                    if request.lam in busy:
                        self.waiting.remove(request)
                        self._passed_over += 1
                        return request
        self._passed_over = 0
        return self.waiting.popleft()

    def _plan_prefill(self) -> tuple[tuple[PackPlan, ...], tuple[PiecePlan, ...]]:
        budget = self.prefill_chunk
        packs: dict[float, list[tuple[Running, int]]] = {}
        pieces = []
        for running in sorted((r for r in self.table if r is not None and r.prefilling), key=lambda r: r.request.id):
            real = min(len(running.request.prompt) - running.offset, budget)
            if real == 0:
                break
            if running.offset == 0:
                packs.setdefault(running.request.lam, []).append((running, real))
            else:
                pieces.append(PiecePlan(running, running.offset, real))
            running.offset += real
            budget -= real
            if not running.prefilling:
                self._dispatched(running, 1)  # the last piece picks the first token
        planned = tuple(
            PackPlan(lam, bucket(sum(real for _, real in entries), self.pack_widths), tuple(entries))
            for lam, entries in packs.items()
        )
        return planned, tuple(pieces)

    def _plan_decode(self) -> DecodePlan | None:
        decoding = tuple(r for r in self.table if r is not None and not r.prefilling)
        if not decoding:
            return None
        steps = self.steps_per_call
        if self.waiting:
            steps = min(steps, min(r.budget_left for r in decoding))
        lambdas = {r.request.lam for r in decoding}
        live = tuple(r is not None for r in self.table)
        rows = bucket(1 + max(r.slot for r in decoding), self.row_buckets)
        for running in decoding:
            self._dispatched(running, steps)
        return DecodePlan(rows, steps, next(iter(lambdas)) if len(lambdas) == 1 else None, decoding, live)

    def _dispatched(self, running: Running, steps: int) -> None:
        """``steps`` more tokens of ``running`` are on their way; its slot is free once its budget is."""
        running.dispatched = min(running.request.max_new_tokens, running.dispatched + steps)
        if running.budget_left == 0 and self.table[running.slot] is running:
            self.table[running.slot] = None
            self.finishing[running.request.id] = running

    # ------------------------------------------------------------------ what came back

    def deliver(self, running: Running, tokens: list[int], logprobs: list[float]) -> TokenEvent | None:
        """``running``'s next tokens, as read back (the first token's time is stamped here); an
        event, or None for a request that was cancelled meanwhile."""
        if not self._holds(running):
            return None
        if running.first_token is None:
            running.first_token = time.perf_counter()
        running.tokens += tokens
        running.logprobs += logprobs
        reason = None
        if running.tokens and running.tokens[-1] in running.request.stop_tokens:
            reason = "stop"
        elif len(running.tokens) >= running.request.max_new_tokens:
            reason = "length"
        if reason is None:
            return TokenEvent(running.request.id, tuple(tokens)) if tokens else None
        self._release(running)
        result = result_of(running.request, running.tokens, running.logprobs, reason, running.first_token)
        return TokenEvent(running.request.id, tuple(tokens), result)

    def _holds(self, running: Running) -> bool:
        return self.table[running.slot] is running or self.finishing.get(running.request.id) is running

    def _release(self, running: Running) -> None:
        self.finishing.pop(running.request.id, None)
        if self.table[running.slot] is running:
            self.table[running.slot] = None
