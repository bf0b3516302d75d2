"""OpenAI's wire format: request bodies (pydantic), response and stream-chunk bodies, error bodies.

Only what the server implements is declared; fields it does not know are accepted and ignored
(as OpenAI-compatible servers do), so clients that send more keep working. dami-jax's own field,
``lambda``, rides in the body (the official client sends it with ``extra_body``); every response
and chunk carries the ``lambda`` that served it beside ``usage``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampled(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)  # not OpenAI's; as vLLM and llama.cpp's servers take it
    ignore_eos: bool = False  # not OpenAI's; as vLLM takes it: run to max_tokens
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    lam: float | str | None = Field(None, alias="lambda")


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(_Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    reasoning_effort: str | None = None

    def budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        """The messages as chat-template input ("developer" is OpenAI's newer name for "system")."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Sampled):
    prompt: str | list[str]
    reasoning_effort: str | None = None

    def budget(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


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

    def choice(self, index: int, text: str, finish_reason: str | None, first: bool = False, chunk: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if chunk:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish_reason}
