"""OpenAI's wire format: request bodies (pydantic), response and stream-chunk bodies, error bodies.

Requests are held to OpenAI's types, as OpenAI holds them: a string where a number or a boolean
belongs is refused (nothing is coerced), and so is a field OpenAI does not define. OpenAI fields
this server does not implement (:data:`NEUTRAL`: ``tools``, ``response_format``, ``logit_bias``,
...) are refused by name unless they carry the value that means "none" (``"tools": []``,
``"frequency_penalty": 0``; null means absent everywhere); bookkeeping fields that change no
output (:data:`IGNORED`: ``user``, ``metadata``, ``store``, ...) are accepted. Beyond OpenAI's
fields: ``lambda`` (dami-jax's, which the official client sends with ``extra_body``), and
``top_k`` and ``ignore_eos`` as vLLM takes them. Every response and chunk carries the ``lambda``
that served it beside ``usage``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dami_jax.errors import InputError

# OpenAI request fields that are not implemented here -> the values that ask for nothing (besides null).
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},), "logit_bias": ({},), "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0), "modalities": (["text"],), "audio": (), "prediction": (),
    "web_search_options": (), "verbosity": (), "best_of": (1,), "suffix": (),
}  # fmt: skip
# OpenAI request fields that change no output: accepted and not used.
IGNORED = ("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
           "parallel_tool_calls")  # fmt: skip
# The same for a message: what a client sends back with an assistant message it was given.
MESSAGE_NEUTRAL: dict[str, tuple[Any, ...]] = {"tool_calls": ([],), "function_call": (), "audio": (), "name": ()}
MESSAGE_IGNORED = ("refusal", "annotations")


class RequestError(InputError):
    """A request the server refuses: HTTP ``status`` and OpenAI's error fields (``param``: the
    body field at fault)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = "invalid_value", status: int = 400,
                 kind: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.param, self.code, self.status, self.kind = param, code, status, kind


def without_unused(body: dict[str, Any], neutral: dict[str, tuple[Any, ...]], ignored: tuple[str, ...], where: str = "") -> dict[str, Any]:
    """``body`` less its ignored fields and its unimplemented fields that ask for nothing; an
    unimplemented field that asks for something is a :class:`RequestError` naming it."""
    kept = {}
    for name, value in body.items():
        if name in neutral:
            if value is not None and not any(type(value) is type(v) and value == v for v in neutral[name]):
                raise RequestError(f"{where}{name} is not supported by this server", f"{where}{name}", "unsupported_parameter")
        elif name not in ignored:
            kept[name] = value
    return kept


class _Strict(BaseModel):
    """OpenAI's types without coercion; unknown fields are errors; null takes a field's default."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info) -> Any:
        field = cls.model_fields[info.field_name]
        return field.get_default(call_default_factory=True) if value is None and not field.is_required() else value


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool = False  # OpenAI's padding against side channels; nothing to pad here


class _Sampled(_Strict):
    """The fields both endpoints share."""

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)  # not OpenAI's; as vLLM and llama.cpp's servers take it
    ignore_eos: bool = False  # not OpenAI's; as vLLM takes it: run to max_tokens
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    lam: float | str | None = Field(None, alias="lambda")
    reasoning_effort: str | None = None


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(_Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def budget(self) -> tuple[int | None, str]:
        """The answer's token budget and the field that set it."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def chat(self) -> list[dict[str, str]]:
        """The messages as chat-template input ("developer" is OpenAI's newer name for "system")."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Sampled):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    def budget(self) -> tuple[int | None, str]:
        return self.max_tokens, "max_tokens"

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a text, or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


def from_validation_error(error: ValidationError) -> RequestError:
    """A request body's first type error as OpenAI names it (``param``: the field's path)."""
    first = error.errors()[0]
    names = []
    for part in first.get("loc", ()):
        if isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool")):
            break  # pydantic's label for a member of a union of types, not a field
        names.append(str(part))
    param, kind = ".".join(names) or None, first.get("type", "")
    if kind == "extra_forbidden":
        return RequestError(f"{param}: unknown parameter", param, "unknown_parameter")
    if kind == "missing":
        return RequestError(f"{param}: required", param, "missing_required_parameter")
    return RequestError(f"{param or 'body'}: {first.get('msg')}", param, "invalid_type" if kind.endswith("_type") else "invalid_value")


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


class ResponseHead:
    """What every response and chunk of one request starts with: id, object kind, time, model."""

    def __init__(self, chat: bool, model: str, lam: float):
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.chat, self.model, self.lam, self.created = chat, model, lam, int(time.time())

    def body(self, choices: list[dict[str, Any]], usage_: dict[str, int] | None, chunk: bool = False) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage_ is not None or not chunk:
            body["usage"] = usage_
        body["lambda"] = self.lam
        return body

    def choice(self, index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None = None,
               first: bool = False, chunk: bool = False) -> dict[str, Any]:  # fmt: skip
        """One choice of a response, or of a chunk (whose ``first`` opens the assistant's turn)."""
        if not self.chat:
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        if chunk:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        message = {"role": "assistant", "content": text, "refusal": None}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
