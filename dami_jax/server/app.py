"""The OpenAI-compatible HTTP app (FastAPI on uvicorn) over one engine.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (plain JSON, or server-sent
events ending in ``data: [DONE]`` with ``stream: true``), ``GET /v1/models``, ``GET /health``
and ``GET /metrics`` (Prometheus). Every request is served on theta(lambda) with the lambda that
:class:`~dami_jax.server.intensity.Intensity` picks for it, rendered with the chat template that
the sweep's rule (:func:`dami_jax.dami.pair.template_for`) gives for that lambda. Each of its
``n`` choices is one engine request.

Errors use OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``: 400 for anything
wrong with a request (malformed JSON and schema errors included), 401 for a wrong or missing key
under ``api_key``, 429 with ``Retry-After`` when the engine's queue is full, 503 while shutting
down. A request that fails is answered alone: the engine and the other requests go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import jax
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from dami_jax.dami.pair import ModelPair, template_for
from dami_jax.decoding.sampling import GREEDY, Sampling
from dami_jax.engine.engine import Engine, Result, TokenEvent
from dami_jax.errors import InputError
from dami_jax.models.tokenizer import chat_tokens
from dami_jax.server.intensity import Intensity, RequestError, stop_strings
from dami_jax.server.metrics import Metrics
from dami_jax.server.protocol import ChatRequest, CompletionRequest, ResponseHead, error_body, usage
from dami_jax.server.runner import EngineRunner, QueueFull, RunnerStopped

COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions (chat: the rest of the context)
DISCONNECT_POLL_S = 0.1
RETRY_AFTER_S = 1
# The engine's argument names, as the request body calls them.
BODY_PARAMS = {"max_new_tokens": "max_tokens", "lam": "lambda", "stop_tokens": "stop", "key": "seed"}


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model_name: str
    template: str = "thinking"  # dami_jax.dami.pair.TEMPLATES: whose chat template renders a request
    api_key: str | None = None
    max_queue: int = 64  # waiting requests beyond which a new one gets 429
    drain_timeout_s: float = 30.0  # on shutdown, how long requests in flight may take to finish


class _Choice:
    """One choice's text as its tokens come: stop strings cut it, and a streamed piece never
    ends inside a character or inside what may become a stop string."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.text, self.shown = "", 0
        self.finish_reason: str | None = None
        self.request_id: int | None = None

    def add(self, tokens: tuple[int, ...], result: Result | None) -> None:
        if self.finish_reason is not None:
            return
        self.ids += tokens
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.finish_reason = self.text[:cut], "stop"
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


class Service:
    """Turns requests into engine requests and engine events into OpenAI responses."""

    def __init__(self, pair: ModelPair, engine: Engine, intensity: Intensity, config: ServerConfig):
        self.pair, self.engine, self.intensity, self.config = pair, engine, intensity, config
        self.metrics = Metrics()
        self.metrics.slots.set(engine.slots)
        self.runner = EngineRunner(engine, max_queue=config.max_queue, on_step=self.metrics.after_step)

    async def answer(self, http: Request, req: ChatRequest | CompletionRequest) -> Response:
        if req.model != self.config.model_name:
            raise RequestError(f"model {req.model!r} is not served here; GET /v1/models lists {self.config.model_name!r}",
                               "model", "model_not_found")  # fmt: skip
        chat = isinstance(req, ChatRequest)
        messages = req.chat if chat else lambda: [{"role": "user", "content": p} for p in req.prompts()[:1]]
        lam = await asyncio.to_thread(self.intensity.choose, req.lam, req.reasoning_effort, messages)
        tokenizer = self.pair.tokenizers[template_for(self.config.template, lam)]
        if not chat and not all(req.prompts()):
            raise RequestError("prompt: needs at least one character", "prompt")
        prompts = [chat_tokens(tokenizer, req.chat())] if chat else [tokenizer.encode(p) for p in req.prompts()]
        stops = stop_strings(req.stop)
        budget = req.budget()
        if budget is not None and budget < 1:
            raise RequestError(f"max_tokens must be at least 1, got {budget}", "max_tokens")
        head = ResponseHead(chat, self.config.model_name, lam)
        choices, queues = [], []
        loop = asyncio.get_running_loop()
        try:
            for index in range(len(prompts) * req.n):
                prompt = prompts[index // req.n]
                choice, events = _Choice(tokenizer, stops), asyncio.Queue()
                choices.append(choice)
                queues.append(events)
                choice.request_id = await self._submit(loop, events, req, prompt, lam, budget, index, chat)
        except BaseException:
            self._cancel(choices)
            raise
        arrived = time.perf_counter()
        prompt_tokens = sum(len(prompts[i // req.n]) for i in range(len(choices)))
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(self._stream(head, choices, queues, prompt_tokens, include_usage, arrived),
                                     media_type="text/event-stream")  # fmt: skip
        done = asyncio.ensure_future(asyncio.gather(*(self._collect(c, q, arrived) for c, q in zip(choices, queues))))
        try:
            await _unless_disconnected(http, done)
        finally:
            self._cancel(choices)
        completion = sum(len(c.ids) for c in choices)
        bodies = [head.choice(i, c.text, c.finish_reason) for i, c in enumerate(choices)]
        return JSONResponse(head.body(bodies, usage(prompt_tokens, completion)))

    async def _submit(self, loop, events: asyncio.Queue, req, prompt: list[int], lam: float, budget: int | None, index: int, chat: bool) -> int:
        if budget is None:
            budget = max(1, self.engine.context - len(prompt)) if chat else COMPLETION_DEFAULT_TOKENS
        if req.temperature == 0:
            sampling, key = GREEDY, None
        else:
            sampling = Sampling(req.temperature, req.top_k, None if req.top_p >= 1 else req.top_p)
            seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little")
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
        """Take one event into ``choice``; False once the choice is finished."""
        event = await events.get()
        if isinstance(event, BaseException):
            raise RuntimeError(f"the engine failed: {event!r}")
        if not choice.ids and event.tokens:
            self.metrics.ttft.observe(time.perf_counter() - arrived)
        self.metrics.generated_tokens.inc(len(event.tokens))
        choice.add(event.tokens, event.result)
        if choice.finish_reason is not None and event.result is None:  # a stop string: the engine may stop now
            self.runner.cancel(choice.request_id)
        if choice.finish_reason is not None:
            self.metrics.latency.observe(time.perf_counter() - arrived)
            self.metrics.requests.labels(outcome=choice.finish_reason).inc()
        return choice.finish_reason is None

    async def _collect(self, choice: _Choice, events: asyncio.Queue, arrived: float) -> None:
        while await self._next(choice, events, arrived):
            pass

    async def _stream(self, head: ResponseHead, choices: list[_Choice], queues: list[asyncio.Queue], prompt_tokens: int,
                      include_usage: bool, arrived: float) -> AsyncIterator[str]:  # fmt: skip
        pending: dict[asyncio.Future, int] = {}
        try:
            for i in range(len(choices)):
                yield _sse(head.body([head.choice(i, "", None, first=True, chunk=True)], None, chunk=True))
                pending[asyncio.ensure_future(self._next(choices[i], queues[i], arrived))] = i
            while pending:
                finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    i = pending.pop(task)
                    going = task.result()
                    piece, choice = choices[i].piece(), choices[i]
                    if piece or not going:
                        yield _sse(head.body([head.choice(i, piece, None if going else choice.finish_reason, chunk=True)], None, chunk=True))
                    if going:
                        pending[asyncio.ensure_future(self._next(choice, queues[i], arrived))] = i
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

    def guarded(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        async def route(http: Request) -> Response:
            if config.api_key is not None and http.headers.get("authorization") != f"Bearer {config.api_key}":
                return JSONResponse(error_body("invalid or missing API key", "authentication_error", None, "invalid_api_key"), 401)
            return await handler(http)

        return route

    async def parsed(http: Request, model):
        try:
            body = await http.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(f"the body is not valid JSON ({error})", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object", None, "invalid_json")
        return model.model_validate(body)

    @guarded
    async def chat_completions(http: Request) -> Response:
        return await service.answer(http, await parsed(http, ChatRequest))

    @guarded
    async def completions(http: Request) -> Response:
        return await service.answer(http, await parsed(http, CompletionRequest))

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
        return JSONResponse(error_body(str(error), param=error.param, code=error.code), 400)

    @app.exception_handler(ValidationError)
    @app.exception_handler(RequestValidationError)
    async def invalid(_, error: ValidationError | RequestValidationError) -> Response:
        first = error.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        param = ".".join(loc[1:] if loc[:1] == ["body"] else loc) or None
        return JSONResponse(error_body(f"{param or 'body'}: {first.get('msg')}", param=param, code="invalid_value"), 400)

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
