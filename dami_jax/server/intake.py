"""From an HTTP request to prompt token ids, refusing what cannot be served before it costs much.

The checks run cheapest first, so a hostile request is refused before it can stall anyone:

1. the body: JSON by its content type (else 415), at most ``max_body_bytes`` (else 413, from its
   Content-Length before a byte is read, or counted while reading), valid JSON (NaN and Infinity
   are not JSON);
2. the fields, by OpenAI's types (:mod:`dami_jax.server.protocol`);
3. the prompt's length in characters: no token spells more characters than the vocabulary's
   longest entry, so a prompt longer than the context times that cannot fit however it
   tokenizes, and is refused without being tokenized (megabytes take seconds to tokenize);
4. the lambda choice (a router may run a model), chat template and tokenizer, on a worker thread,
   never on the event loop; then the token counts against the context.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from dami_jax.models.tokenizer import chat_tokens
from dami_jax.server.protocol import (
    IGNORED, MESSAGE_IGNORED, MESSAGE_NEUTRAL, NEUTRAL, ChatRequest, CompletionRequest, RequestError, without_unused,
)  # fmt: skip

COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions (chat: the rest of the context)


async def read_json(http: Request, max_bytes: int) -> dict[str, Any]:
    """The request's JSON object, read whole only when it is JSON and within ``max_bytes``."""
    content_type = http.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise RequestError(f"send the body as JSON with Content-Type: application/json (got {content_type or 'none'!r})",
                           None, "unsupported_media_type", 415)  # fmt: skip
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks), parse_constant=_not_json)
    except RecursionError:
        raise RequestError("the body is not valid JSON (nested too deeply)", None, "invalid_json") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise RequestError(f"the body is not valid JSON ({error})", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object", None, "invalid_json")
    return body


def _too_large(max_bytes: int) -> RequestError:
    return RequestError(f"the body is larger than this server takes ({max_bytes} bytes, --max-body-bytes)", None,
                        "request_too_large", 413)  # fmt: skip


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON number")


def parse(body: dict[str, Any], chat: bool) -> ChatRequest | CompletionRequest:
    """The request model of ``body`` (pydantic's ValidationError for wrong types and unknown fields)."""
    body = without_unused(body, NEUTRAL, IGNORED)
    if chat and isinstance(body.get("messages"), list):
        body["messages"] = [without_unused(m, MESSAGE_NEUTRAL, MESSAGE_IGNORED, f"messages.{i}.") if isinstance(m, dict) else m
                            for i, m in enumerate(body["messages"])]  # fmt: skip
    return (ChatRequest if chat else CompletionRequest).model_validate(body)


def check_length(req: ChatRequest | CompletionRequest, context: int, chars_per_token: int) -> None:
    """Refuse a prompt that cannot fit ``context`` tokens by its length alone (nothing tokenized)."""
    if isinstance(req, ChatRequest):
        measured = [("messages", sum(len(m.text()) for m in req.messages), "characters")]
    else:
        prompts = req.prompts()
        if not prompts or not all(prompts):
            raise RequestError("prompt: needs at least one character or token", "prompt")
        measured = [("prompt", len(p), "characters" if isinstance(p, str) else "tokens") for p in prompts]
    for param, size, unit in measured:
        if size > context * (chars_per_token if unit == "characters" else 1):
            why = f" (no token here spells more than {chars_per_token} characters)" if unit == "characters" else ""
            raise RequestError(f"{param}: {size} {unit} cannot fit the context of {context} tokens per request{why}",
                               param, "context_length_exceeded")  # fmt: skip


def tokenize(req: ChatRequest | CompletionRequest, tokenizer, vocab_size: int) -> list[list[int]]:
    """Each prompt's token ids: chat messages through the chat template; completion text as it is.
    Slow for long prompts: call it off the event loop."""
    if isinstance(req, ChatRequest):
        return [chat_tokens(tokenizer, req.chat())]
    prompts = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in req.prompts()]
    for prompt in prompts:
        if outside := [t for t in prompt if not 0 <= t < vocab_size]:
            raise RequestError(f"prompt: token id {outside[0]} is outside the vocabulary [0, {vocab_size})", "prompt")
    return prompts


def budgets(req: ChatRequest | CompletionRequest, prompts: list[list[int]], context: int, most: int) -> list[int]:
    """The answer's token budget for each prompt: ``max_tokens`` (or ``max_completion_tokens``)
    when given, else the rest of the context (chat) or 16 (completions), as OpenAI has it, and
    never more than ``most`` (the server's limit per answer).
    0 only for completions that echo their prompt (its log-probs alone, as evaluation harnesses ask)."""
    chat = isinstance(req, ChatRequest)
    asked, field = req.budget()
    if asked is not None and asked < (0 if not chat and req.echo else 1):
        raise RequestError(f"{field} must be at least 1" + ("" if chat else " (0 only with echo)") + f", got {asked}", field)
    out = []
    for prompt in prompts:
        room = context - len(prompt)
        if room < (0 if asked == 0 else 1):
            raise RequestError(f"{'messages' if chat else 'prompt'}: {len(prompt)} tokens leave no room in the context of "
                               f"{context} tokens per request", "messages" if chat else "prompt", "context_length_exceeded")  # fmt: skip
        if asked is not None and asked > room:
            raise RequestError(f"{field}: {asked} tokens after the prompt's {len(prompt)} exceed the context of {context} "
                               "tokens per request", field, "context_length_exceeded")  # fmt: skip
        if asked is not None and asked > most:
            raise RequestError(f"{field}: {asked} tokens exceed this server's limit of {most} tokens per answer", field)
        room = min(room, most)
        out.append(asked if asked is not None else (room if chat else min(COMPLETION_DEFAULT_TOKENS, room)))
    return out
