"""The engine on a thread of its own, for callers on other threads (the HTTP server's event loop).

The :class:`~dami_jax.engine.engine.Engine` is plain single-threaded Python over jax. The
:class:`EngineRunner` owns it on one thread that alternates between taking commands (submit,
cancel) and running engine steps, and hands every request's events to the callback it was
submitted with, on that thread. A submission is checked by the engine itself before it is
queued, and the answer (its id, or the error) comes back to the caller; a full queue is refused
at once with :class:`QueueFull`, so the backlog stays bounded.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

from dami_jax.engine.engine import Engine, TokenEvent
from dami_jax.engine.lockstep import Leader

IDLE_WAIT_S = 0.05  # how long the idle thread sleeps between looks at its commands


class QueueFull(Exception):
    """The engine's queue holds ``max_queue`` waiting requests already."""


class RunnerStopped(Exception):
    """The runner no longer takes requests (it is draining or has stopped)."""


@dataclasses.dataclass(frozen=True)
class _Submit:
    options: dict[str, Any]
    on_event: Callable[[TokenEvent | BaseException], None]
    answer: Future


@dataclasses.dataclass(frozen=True)
class _Cancel:
    request_id: int


class EngineRunner:
    """Runs ``engine`` on a background thread. ``max_queue``: waiting requests beyond which
    :meth:`submit` raises :class:`QueueFull`. ``on_step``: called on the engine thread after
    every step with the engine (for gauges). ``leader``: the engine spans processes, whose
    followers replay what this thread applies (:mod:`~dami_jax.engine.lockstep`)."""

    def __init__(self, engine: Engine, *, max_queue: int = 64, on_step: Callable[[Engine], None] | None = None,
                 leader: Leader | None = None):  # fmt: skip
        self.engine, self.max_queue, self.on_step, self.leader = engine, max_queue, on_step, leader
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._callbacks: dict[int, Callable[[TokenEvent | BaseException], None]] = {}
        self._accepting = True
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dami-jax-engine", daemon=True)
        self.error: BaseException | None = None  # what stopped the thread, if anything did

    def start(self) -> "EngineRunner":
        self._thread.start()
        return self

    def submit(self, on_event: Callable[[TokenEvent | BaseException], None], **options: Any) -> Future:
        """Queue a request (``Engine.submit``'s keywords, ``prompt`` included); ``on_event`` gets
        each of its events on the engine thread (or, should the engine fail, the exception).
        Returns a future of its id, which raises what the engine's checks raise
        (:class:`~dami_jax.errors.InputError`) or :class:`QueueFull`; raises
        :class:`RunnerStopped` at once when the runner no longer takes requests."""
        if not self._accepting or not self._thread.is_alive():
            raise RunnerStopped("the server is shutting down")
        answer: Future = Future()
        self._commands.put(_Submit(options, on_event, answer))
        return answer

    def cancel(self, request_id: int) -> None:
        """Drop a request (waiting or running); its slot is free at the next step."""
        self._commands.put(_Cancel(request_id))

    def drain(self, timeout_s: float) -> bool:
        """Stop taking requests and wait up to ``timeout_s`` for those in flight; True if they all finished."""
        self._accepting = False
        deadline = time.monotonic() + timeout_s
        while self._callbacks and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(IDLE_WAIT_S)
        return not self._callbacks

    def stop(self) -> None:
        self._accepting = False
        self._stopping.set()
        self._thread.join()

    # ------------------------------------------------------------------ the engine thread

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                self._take_commands(block=self.engine.idle)
                if self.leader is not None:
                    self.leader.share()
                if not self.engine.idle:
                    for event in self.engine.step():
                        self._deliver(event)
                if self.on_step is not None:
                    self.on_step(self.engine)
        except BaseException as error:  # noqa: BLE001 - kept for /health and the log; every waiter is told
            self.error = error
            for callback in self._callbacks.values():
                callback(error)
            self._callbacks.clear()
            raise
        finally:
            if self.leader is not None:
                self.leader.stop()

    def _take_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._run(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _run(self, command: _Submit | _Cancel) -> None:
        if isinstance(command, _Cancel):
            result = self.engine.cancel(command.request_id)
            if self.leader is not None:
                self.leader.cancelled(command.request_id)
            if result is not None:
                self._deliver(TokenEvent(result.id, (), result))
            return
        if self.engine.waiting >= self.max_queue:
            command.answer.set_exception(QueueFull(f"{self.engine.waiting} requests are waiting already"))
            return
        try:
            request_id = self.engine.submit(**command.options)
        except Exception as error:  # noqa: BLE001 - the caller's to report (a bad request, most often)
            command.answer.set_exception(error)
            return
        if self.leader is not None:
            self.leader.submitted(command.options)
        self._callbacks[request_id] = command.on_event
        command.answer.set_result(request_id)

    def _deliver(self, event: TokenEvent) -> None:
        callback = self._callbacks.get(event.id)
        if event.result is not None:
            self._callbacks.pop(event.id, None)
        if callback is not None:
            callback(event)
