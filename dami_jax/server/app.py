"""The OpenAI-compatible HTTP app (FastAPI on uvicorn) over one engine.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (plain JSON, or server-sent
events ending in ``data: [DONE]`` with ``stream: true``), ``GET /v1/models``, ``GET /health``
and ``GET /metrics`` (Prometheus). Every request is served on theta(lambda) with the lambda that
:class:`~dami_jax.server.intensity.Intensity` picks for it, rendered with the chat template that
the sweep's rule (:func:`dami_jax.dami.pair.template_for`) gives for that lambda. Each of its
``n`` choices is one engine request. Log-probs, when asked for, come from
:class:`~dami_jax.server.logprobs.Scorer`; in a stream, each chunk carries those of the tokens its
text stands on.

Errors use OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``: 400 for a request
that is wrong (see :mod:`dami_jax.server.intake` for the order of the checks), 401 for a wrong or
missing key (compared in constant time), 404 for an unknown route or model
(``model_not_found``), 405 for a wrong method, 413 for a body over ``max_body_bytes``, 415 for a
body that is not JSON, 429 with ``Retry-After`` when the engine's queue is full, 503 while
shutting down. A request that fails is answered alone: the engine and the other requests go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import os
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import jax
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from dami_jax.dami.pair import ModelPair, template_for
from dami_jax.decoding.sampling import GREEDY, Sampling
from dami_jax.engine.engine import Engine, Result, TokenEvent
from dami_jax.engine.lockstep import Leader
from dami_jax.errors import InputError
from dami_jax.server.intake import budgets, check_length, parse, read_json, tokenize
from dami_jax.server.intensity import Intensity, stop_strings
from dami_jax.server.logprobs import Scorer, Spelling
from dami_jax.server.metrics import Metrics
from dami_jax.server.protocol import (
    ChatRequest, CompletionRequest, RequestError, ResponseHead, error_body, from_validation_error, usage,
)  # fmt: skip
from dami_jax.server.runner import EngineRunner, QueueFull, RunnerStopped

DISCONNECT_POLL_S = 0.1
RETRY_AFTER_S = 1
MAX_BODY_BYTES = 8 * 2**20  # room for a 128k-token prompt as JSON
# The engine's argument names, as the request body calls them.
BODY_PARAMS = {"max_new_tokens": "max_tokens", "lam": "lambda", "stop_tokens": "stop", "key": "seed"}


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model_name: str
    template: str = "thinking"  # dami_jax.dami.pair.TEMPLATES: whose chat template renders a request
    api_key: str | None = None
    max_queue: int = 64  # waiting requests beyond which a new one gets 429
    drain_timeout_s: float = 30.0  # on shutdown, how long requests in flight may take to finish
    max_body_bytes: int = MAX_BODY_BYTES  # larger bodies get 413 before they are read
    # The engine spans processes (jax.distributed): its followers replay each step; log-probs,
    # which the model computes outside the engine, are refused.
    across_processes: bool = False


@dataclasses.dataclass(frozen=True)
class _Asked:
    """What a request asks for beyond text: log-probs (with ``top`` alternatives), the prompt echoed."""

    logprobs: bool
    top: int
    echo: bool

    @classmethod
    def of(cls, req: ChatRequest | CompletionRequest) -> "_Asked":
        if isinstance(req, CompletionRequest):
            return cls(req.logprobs is not None, req.logprobs or 0, req.echo)
        if req.top_logprobs and not req.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
        return cls(req.logprobs, req.top_logprobs or 0, False)


class _Choice:
    """One choice's text as its tokens come: stop strings cut it, and a streamed piece never
    ends inside a character or inside what may become a stop string. ``echo``: the prompt text
    it opens with; ``scored``: how many of prompt + tokens have had their log-probs sent."""

    def __init__(self, tokenizer, stops: tuple[str, ...], prompt: list[int], echo: str | None):
        self.tokenizer, self.stops, self.prompt = tokenizer, stops, prompt
        self.echo, self.scored = echo or "", 0 if echo is not None else len(prompt)
        self.ids: list[int] = []
        self.text, self.shown, self.cut, self._settled = "", 0, False, 0
        self.finish_reason: str | None = None
        self.request_id: int | None = None

    def add(self, tokens: tuple[int, ...], result: Result | None) -> None:
        if self.finish_reason is not None:
            return
        self.ids += tokens
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.finish_reason, self.cut = self.text[:cut], "stop", True
        elif result is not None:
            self.finish_reason = "stop" if result.finish_reason == "stop" else "length"

    def piece(self) -> str:
        """The text not shown yet that is safe to show."""
        end = len(self.text)
        if self.finish_reason is None:
            end -= max((len(s) for s in self.stops), default=1) - 1
            if self.text.endswith("\ufffd"):
                end = min(end, len(self.text) - 1)
        if end <= self.shown:
            return ""
        out, self.shown = self.text[self.shown : end], end
        return out

    def settled(self) -> int:
        """How many tokens the text shown so far stands on: all once finished, unless a stop
        string cut the text (then those that spell what is left)."""
        if self.finish_reason is not None and not self.cut:
            return len(self.ids)
        target = len(self.text) if self.finish_reason is not None else self.shown
        while self._settled < len(self.ids) and len(self.tokenizer.decode(self.ids[: self._settled], skip_special_tokens=True)) < target:
            self._settled += 1
        return self._settled


class Service:
    """Turns requests into engine requests and engine events into OpenAI responses."""

    def __init__(self, pair: ModelPair, engine: Engine, intensity: Intensity, config: ServerConfig):
        self.pair, self.engine, self.intensity, self.config = pair, engine, intensity, config
        self.metrics = Metrics()
        self.metrics.started(engine)
        self.runner = EngineRunner(engine, max_queue=config.max_queue, on_step=self.metrics.after_step,
                                   leader=Leader() if config.across_processes else None)  # fmt: skip
        self.scorer = Scorer(pair)
        self.spellings = {name: Spelling(tokenizer) for name, tokenizer in pair.tokenizers.items()}
        self.chars_per_token = max(len(token) for tokenizer in pair.tokenizers.values() for token in tokenizer.get_vocab())

    async def answer(self, http: Request, req: ChatRequest | CompletionRequest) -> Response:
        if req.model != self.config.model_name:
            raise RequestError(f"model {req.model!r} is not served here; GET /v1/models lists {self.config.model_name!r}",
                               "model", "model_not_found", 404)  # fmt: skip
        chat, asked, stops = isinstance(req, ChatRequest), _Asked.of(req), stop_strings(req.stop)
        if asked.logprobs and self.config.across_processes:
            raise RequestError("logprobs: not available from a server that spans several processes", "logprobs")
        check_length(req, self.engine.context, self.chars_per_token)
        lam, template, prompts = await asyncio.to_thread(self._prompts, req)
        tokenizer, spelling = self.pair.tokenizers[template], self.spellings[template]
        budget = budgets(req, prompts, self.engine.context, self.engine.max_new_tokens)
        head = ResponseHead(chat, self.config.model_name, lam)
        choices, queues = [], []
        loop = asyncio.get_running_loop()
        try:
            for index in range(len(prompts) * req.n):
                prompt = prompts[index // req.n]
                source = req.prompts()[index // req.n] if asked.echo else None
                echo = None if source is None else source if isinstance(source, str) else tokenizer.decode(source)
                choice, events = _Choice(tokenizer, stops, prompt, echo), asyncio.Queue()
                choices.append(choice)
                queues.append(events)
                if budget[index // req.n] == 0:  # the prompt's log-probs alone
                    choice.finish_reason = "length"
                else:
                    choice.request_id = await self._submit(loop, events, req, prompt, lam, budget[index // req.n], index, chat)
        except BaseException:
            self._cancel(choices)
            raise
        arrived = time.perf_counter()
        prompt_tokens = sum(len(c.prompt) for c in choices)
        logprobs = (lambda choice, offset: self._logprobs(choice, lam, asked, spelling, chat, offset)) if asked.logprobs else None
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(self._stream(head, choices, queues, prompt_tokens, include_usage, arrived, logprobs),
                                     media_type="text/event-stream")  # fmt: skip
        done = asyncio.ensure_future(asyncio.gather(*(self._collect(c, q, arrived) for c, q in zip(choices, queues))))
        try:
            await _unless_disconnected(http, done)
        finally:
            self._cancel(choices)
        completion = sum(len(c.ids) for c in choices)
        bodies = [head.choice(i, c.echo + c.text, c.finish_reason, logprobs and await logprobs(c, 0)) for i, c in enumerate(choices)]
        return JSONResponse(head.body(bodies, usage(prompt_tokens, completion)))

    def _prompts(self, req: ChatRequest | CompletionRequest) -> tuple[float, str, list[list[int]]]:
        """(lambda, whose template, each prompt's token ids); blocking work, for a worker thread."""
        if isinstance(req, ChatRequest):
            messages = req.chat
        else:
            first = req.prompts()[0]
            text = first if isinstance(first, str) else self.pair.tokenizers["instruct"].decode(first)
            messages = lambda: [{"role": "user", "content": text}]  # noqa: E731 - what a router reads
        lam = self.intensity.choose(req.lam, req.reasoning_effort, messages)
        template = template_for(self.config.template, lam)
        return lam, template, tokenize(req, self.pair.tokenizers[template], self.pair.cfg.vocab_size)

    async def _submit(self, loop, events: asyncio.Queue, req, prompt: list[int], lam: float, budget: int, index: int, chat: bool) -> int:
        if req.temperature == 0:
            sampling, key = GREEDY, None
        else:
            sampling = Sampling(req.temperature, req.top_k, None if req.top_p >= 1 else req.top_p)
            seed = req.seed % 2**32 if req.seed is not None else int.from_bytes(os.urandom(4), "little")
            key = jax.random.fold_in(jax.random.key(seed), index)

        def on_event(event: TokenEvent | BaseException) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            future = self.runner.submit(on_event, prompt=prompt, lam=lam, max_new_tokens=budget, sampling=sampling, key=key,
                                        stop_tokens=[] if req.ignore_eos else None)  # fmt: skip
            return await asyncio.wrap_future(future)
        except InputError as error:
            name = str(error).split(":", 1)[0]
            param = BODY_PARAMS.get(name, "messages" if chat else "prompt") if name.isidentifier() else None
            raise RequestError(str(error).replace("max_new_tokens", "max_tokens").replace("lam:", "lambda:"), param) from None

    async def _next(self, choice: _Choice, events: asyncio.Queue, arrived: float) -> bool:
        """Take the next event into ``choice``, and any that came with it; False once the choice is finished."""
        event = await events.get()
        while True:
            if isinstance(event, BaseException):
                raise RuntimeError(f"the engine failed: {event!r}")
            if not choice.ids and event.tokens:
                self.metrics.ttft.observe(time.perf_counter() - arrived)
            self.metrics.generated_tokens.inc(len(event.tokens))
            choice.add(event.tokens, event.result)
            if choice.finish_reason is not None or events.empty():
                break
            event = events.get_nowait()
        if choice.finish_reason is not None and event.result is None:  # a stop string: the engine may stop now
            self.runner.cancel(choice.request_id)
        if choice.finish_reason is not None:
            self.metrics.latency.observe(time.perf_counter() - arrived)
            self.metrics.requests.labels(outcome=choice.finish_reason).inc()
        return choice.finish_reason is None

    async def _collect(self, choice: _Choice, events: asyncio.Queue, arrived: float) -> None:
        while choice.finish_reason is None and await self._next(choice, events, arrived):
            pass

    async def _logprobs(self, choice: _Choice, lam: float, asked: _Asked, spelling: Spelling, chat: bool, offset: int) -> dict[str, Any]:
        """The log-probs of the tokens settled since the last call (with the prompt's first, under
        echo), in the endpoint's shape; ``offset``: the characters of the choice sent before them."""
        tokens = choice.prompt + choice.ids[: choice.settled()]
        start, choice.scored = choice.scored, len(tokens)
        scored = await asyncio.to_thread(self.scorer.score, lam, tokens, start) if len(tokens) > start else []
        return spelling.chat_logprobs(scored, asked.top) if chat else spelling.completion_logprobs(scored, asked.top, offset)

    async def _stream(self, head: ResponseHead, choices: list[_Choice], queues: list[asyncio.Queue], prompt_tokens: int,
                      include_usage: bool, arrived: float, logprobs) -> AsyncIterator[str]:  # fmt: skip
        pending: dict[asyncio.Future, int] = {}
        sent = [0] * len(choices)  # characters of each choice sent

        async def chunk(i: int, text: str, first: bool = False) -> str:
            choice, offset = choices[i], sent[i]
            sent[i] += len(text)
            lp = logprobs and await logprobs(choice, offset)
            return _sse(head.body([head.choice(i, text, choice.finish_reason, lp, first=first, chunk=True)], None, chunk=True))

        try:
            for i, choice in enumerate(choices):
                yield await chunk(i, choice.echo, first=True)
                if choice.finish_reason is None:
                    pending[asyncio.ensure_future(self._next(choice, queues[i], arrived))] = i
            while pending:
                finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    i = pending.pop(task)
                    going = task.result()
                    piece = choices[i].piece()
                    if piece or not going:
                        yield await chunk(i, piece)
                    if going:
                        pending[asyncio.ensure_future(self._next(choices[i], queues[i], arrived))] = i
            if include_usage:
                yield _sse(head.body([], usage(prompt_tokens, sum(len(c.ids) for c in choices)), chunk=True))
            yield "data: [DONE]\n\n"
        finally:  # a client that went away: free its slots now
            for task in pending:
                task.cancel()
            self._cancel(choices)

    def _cancel(self, choices: list[_Choice]) -> None:
        for choice in choices:
            if choice.request_id is not None and choice.finish_reason is None:
                self.runner.cancel(choice.request_id)
                self.metrics.requests.labels(outcome="cancelled").inc()
                choice.finish_reason = "cancelled"


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


async def _unless_disconnected(http: Request, work: asyncio.Future) -> None:
    """Wait for ``work``; give up (cancelling it) when the client has gone."""
    while not work.done():
        await asyncio.wait([work], timeout=DISCONNECT_POLL_S)
        if not work.done() and await http.is_disconnected():
            work.cancel()
            return
    work.result()


def create_app(service: Service) -> FastAPI:
    """The FastAPI app over ``service``: its engine thread starts with the app and, at shutdown,
    lets requests in flight finish (``drain_timeout_s``) before it stops."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.runner.start()
        yield
        await asyncio.to_thread(service.runner.drain, service.config.drain_timeout_s)
        await asyncio.to_thread(service.runner.stop)

    app = FastAPI(title="dami-jax", lifespan=lifespan)
    config = service.config
    expected = None if config.api_key is None else f"Bearer {config.api_key}".encode()

    def guarded(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        async def route(http: Request) -> Response:
            given = http.headers.get("authorization", "").encode("latin-1")  # the header's bytes, as sent
            if expected is not None and not hmac.compare_digest(given, expected):
                return JSONResponse(error_body("invalid or missing API key", "authentication_error", None, "invalid_api_key"), 401)
            return await handler(http)

        return route

    @guarded
    async def chat_completions(http: Request) -> Response:
        return await service.answer(http, parse(await read_json(http, config.max_body_bytes), chat=True))

    @guarded
    async def completions(http: Request) -> Response:
        return await service.answer(http, parse(await read_json(http, config.max_body_bytes), chat=False))

    @guarded
    async def models(http: Request) -> Response:
        entry = {"id": config.model_name, "object": "model", "created": 0, "owned_by": "dami-jax"}
        return JSONResponse({"object": "list", "data": [entry]})

    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/models", models, methods=["GET"])

    @app.get("/health")
    async def health() -> Response:
        if service.runner.error is not None:
            return JSONResponse({"status": "error", "error": repr(service.runner.error)}, 500)
        return JSONResponse({"status": "ok", "busy_slots": service.engine.busy_slots, "waiting": service.engine.waiting})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(RequestError)
    async def refused(_, error: RequestError) -> Response:
        return JSONResponse(error_body(str(error), error.kind, error.param, error.code), error.status)

    @app.exception_handler(ValidationError)
    async def invalid(http: Request, error: ValidationError) -> Response:
        return await refused(http, from_validation_error(error))

    @app.exception_handler(HTTPException)
    async def no_route(http: Request, error: HTTPException) -> Response:
        message = f"Invalid URL ({http.method} {http.url.path})" if error.status_code == 404 else \
            f"{http.method} {http.url.path}: {error.detail}"  # fmt: skip
        return JSONResponse(error_body(message), error.status_code, headers=error.headers)

    @app.exception_handler(QueueFull)
    async def full(_, error: QueueFull) -> Response:
        return JSONResponse(error_body(f"the server is busy: {error}; retry shortly", "rate_limit_error", None, "queue_full"),
                            429, headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip

    @app.exception_handler(RunnerStopped)
    async def stopping(_, error: RunnerStopped) -> Response:
        return JSONResponse(error_body(str(error), "server_error", None, "shutting_down"), 503)

    @app.exception_handler(Exception)
    async def failed(_, error: Exception) -> Response:
        return JSONResponse(error_body(f"internal error: {error!r}", "server_error", None, "internal_error"), 500)

    return app
