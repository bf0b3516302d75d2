"""The server held to OpenAI's contract: every malformed or hostile request gets its 4xx with
OpenAI's error body while good requests go on, responses validate against OpenAI's published
schemas, and a huge prompt neither stalls other requests nor leaves memory behind. Every load
loop here is bounded in count and time."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest
from serving import HOST, KEY, SCHEMAS, assert_openai
from serving import server  # noqa: F401 - the fixtures
from starlette.requests import Request

from dami_jax.cli.serve import MAX_BODY_BYTES, api_key_from
from dami_jax.errors import InputError
from dami_jax.server import app
from dami_jax.server.intake import read_json
from dami_jax.server.protocol import RequestError

pytestmark = pytest.mark.xdist_group("server")

AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {**AUTH, "Content-Type": "application/json"}
HI = [{"role": "user", "content": "hi"}]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def chat(**fields):
    return {"model": "dami-toy", "messages": HI, **fields}


def completion(**fields):
    return {"model": "dami-toy", "prompt": "a=3, b=a+4. b=?", **fields}


# (path, body: dict or raw bytes, status, param, code); each sent with a JSON content type and the key.
BAD = [
    (CHAT, b"{not json", 400, None, "invalid_json"),
    (CHAT, b"[1, 2]", 400, None, "invalid_json"),
    (CHAT, b'{"model": "dami-toy", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, None, "invalid_json"),
    (CHAT, b"[" * 100_000, 400, None, "invalid_json"),
    (CHAT, b'{"model": "\xff\xfe"}', 400, None, "invalid_json"),
    (CHAT, {"model": "dami-toy"}, 400, "messages", "missing_required_parameter"),
    (CHAT, chat(messages=[]), 400, "messages", None),
    (CHAT, chat(messages="hi"), 400, "messages", "invalid_type"),
    (CHAT, chat(model="gpt-4"), 404, "model", "model_not_found"),
    (CHAT, chat(**{"lambda": 1.5}), 400, "lambda", None),
    (CHAT, chat(**{"lambda": "auto"}), 400, "lambda", None),
    (CHAT, chat(max_tokens=0), 400, "max_tokens", None),
    (CHAT, chat(max_completion_tokens=100000), 400, "max_completion_tokens", "context_length_exceeded"),
    (CHAT, chat(reasoning_effort="max"), 400, "reasoning_effort", None),
    (CHAT, chat(temperature=-1), 400, "temperature", None),
    (CHAT, chat(max_tokens="16"), 400, "max_tokens", "invalid_type"),
    (CHAT, chat(temperature="0"), 400, "temperature", "invalid_type"),
    (CHAT, chat(stream="true"), 400, "stream", "invalid_type"),
    (CHAT, chat(n=1.0), 400, "n", "invalid_type"),
    (CHAT, chat(max_tokens=True), 400, "max_tokens", "invalid_type"),
    (CHAT, chat(seed="1"), 400, "seed", "invalid_type"),
    (CHAT, chat(seed=2**64), 400, "seed", None),
    (CHAT, chat(stream=True, stream_options={"include_usage": "yes"}), 400, "stream_options.include_usage", "invalid_type"),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", "unsupported_parameter"),
    (CHAT, chat(tool_choice="auto"), 400, "tool_choice", "unsupported_parameter"),
    (CHAT, chat(response_format={"type": "json_object"}), 400, "response_format", "unsupported_parameter"),
    (CHAT, chat(logit_bias={"5": 10}), 400, "logit_bias", "unsupported_parameter"),
    (CHAT, chat(frequency_penalty=0.5), 400, "frequency_penalty", "unsupported_parameter"),
    (CHAT, chat(foo=1), 400, "foo", "unknown_parameter"),
    (CHAT, chat(notes="x" * 5_000_000), 400, "notes", "unknown_parameter"),
    (CHAT, chat(messages=[{"role": "tool", "content": "hi"}]), 400, "messages.0.role", None),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400, "messages.0.content", None),
    (CHAT, chat(messages=[{"role": "user", "content": "hi", "name": "ann"}]), 400, "messages.0.name", "unsupported_parameter"),
    (CHAT, chat(top_logprobs=3), 400, "top_logprobs", None),
    (CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", None),
    (CHAT, chat(stop=[""]), 400, "stop", None),
    (CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    (CHAT, chat(messages=[{"role": "user", "content": "7" * 7000}]), 400, "messages", "context_length_exceeded"),  # by length
    (CHAT, chat(messages=[{"role": "user", "content": "7" * 600}]), 400, "messages", "context_length_exceeded"),  # tokenized
    (COMPLETIONS, completion(prompt=""), 400, "prompt", None),
    (COMPLETIONS, completion(prompt=[]), 400, "prompt", None),
    (COMPLETIONS, completion(prompt=[[]]), 400, "prompt", None),
    (COMPLETIONS, completion(prompt=[1, "a"]), 400, "prompt", None),
    (COMPLETIONS, completion(prompt=[5, 10**6]), 400, "prompt", None),
    (COMPLETIONS, completion(prompt=[5] * 600), 400, "prompt", "context_length_exceeded"),
    (COMPLETIONS, completion(logprobs=6), 400, "logprobs", None),
    (COMPLETIONS, completion(logprobs=True), 400, "logprobs", "invalid_type"),
    (COMPLETIONS, completion(echo="yes"), 400, "echo", "invalid_type"),
    (COMPLETIONS, completion(max_tokens=0), 400, "max_tokens", None),
    (COMPLETIONS, completion(suffix="x"), 400, "suffix", "unsupported_parameter"),
    (COMPLETIONS, completion(best_of=3), 400, "best_of", "unsupported_parameter"),
    (COMPLETIONS, completion(stop=[""]), 400, "stop", None),
    (COMPLETIONS, completion(prompt="9" * 5_000_000), 400, "prompt", "context_length_exceeded"),
]


def _post(server, path: str, body, headers=JSON, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=timeout)


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert_openai(body, "ErrorResponse")
    error = body["error"]
    assert error["message"] and error["type"] == ("authentication_error" if status == 401 else "invalid_request_error"), error
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def test_bad_requests_get_openai_errors_and_others_go_on(server):
    good = chat(messages=[{"role": "user", "content": "a=5, b=a+3. b=?"}], temperature=0, max_tokens=40)
    with ThreadPoolExecutor(8) as pool:
        answers = [pool.submit(_post, server, CHAT, good) for _ in range(3)]
        refused = list(pool.map(lambda case: _post(server, case[0], case[1]), BAD))
    for (_, _, status, param, code), response in zip(BAD, refused):
        assert_error(response, status, param, code)
    texts = {a.result().json()["choices"][0]["message"]["content"] for a in answers}
    assert len(texts) == 1 and texts.pop()
    assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"


def test_routes_methods_content_types_and_keys(server):
    assert_error(httpx.get(f"{server.url}{CHAT}", headers=AUTH, timeout=10), 405)
    assert_error(httpx.post(f"{server.url}/v1/nope", headers=JSON, content=b"{}", timeout=10), 404)
    assert_error(httpx.get(f"{server.url}/nope", timeout=10), 404)
    body = json.dumps(chat(max_tokens=2)).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = AUTH if content_type is None else {**AUTH, "Content-Type": content_type}
        assert_error(httpx.post(f"{server.url}{CHAT}", content=body, headers=headers, timeout=10), 415, None, "unsupported_media_type")
    assert _post(server, CHAT, body, headers={**AUTH, "Content-Type": "application/json; charset=utf-8"}).status_code == 200
    for key in ("wrong", KEY + "x", KEY[:-1] + "X", KEY.upper()):
        assert_error(_post(server, CHAT, body, headers={**JSON, "Authorization": f"Bearer {key}"}), 401, None, "invalid_api_key")
    assert_error(_post(server, CHAT, body, headers={"Content-Type": "application/json"}), 401, None, "invalid_api_key")
    latin1 = f"GET /v1/models HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer t\xe9st\r\nConnection: close\r\n\r\n"
    assert _raw(server, latin1.encode("latin-1")).startswith(b"HTTP/1.1 401")


def _raw(server, request: bytes) -> bytes:
    """Send a request as written (what a hostile client may send) and read the whole answer."""
    with socket.create_connection((HOST, server.port), timeout=30) as s:
        s.sendall(request)
        answer = b""
        while len(answer) < 2**20 and (data := s.recv(65536)):  # until the server closes (Connection: close)
            answer += data
        return answer


def test_bodies_over_the_limit_get_413_before_they_are_read(server):
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {MAX_BODY_BYTES + 1}\r\nConnection: close\r\n\r\n").encode()  # fmt: skip
    answer = _raw(server, head)  # refused on its declared length: not a byte of the body is needed
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"
    assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"


def test_an_undeclared_body_is_read_only_up_to_the_limit():
    """A body without Content-Length (chunked) that never ends: reading stops one piece past the limit."""
    pieces = []

    async def receive():
        pieces.append(2**16)
        return {"type": "http.request", "body": b"x" * 2**16, "more_body": True}

    scope = {"type": "http", "method": "POST", "path": CHAT, "headers": [(b"content-type", b"application/json")]}
    with pytest.raises(RequestError) as refused:
        asyncio.run(read_json(Request(scope, receive), 2**20))
    assert refused.value.status == 413 and sum(pieces) == 2**20 + 2**16


def test_a_5mb_prompt_neither_stalls_small_requests_nor_keeps_memory(server):
    """The issue's case: a 5 MB prompt (refused by its length, never tokenized) sent again and
    again while small requests run; their latency stays within a second of what it was before,
    and the server's memory within 10%."""
    small = chat(messages=[{"role": "user", "content": "a=2, b=a+1. b=?"}], temperature=0, max_tokens=4)

    def timed_small() -> float:
        started = time.perf_counter()
        assert _post(server, CHAT, small).status_code == 200
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
        return time.perf_counter() - started

    before = max(timed_small() for _ in range(5))
    memory = server.rss_bytes()
    huge = [chat(messages=[{"role": "user", "content": "7" * 5_000_000}]), completion(prompt="7" * 5_000_000)]
    refused, done = [], threading.Event()

    def send_huge():
        for i in range(6):
            refused.append(_post(server, [CHAT, COMPLETIONS][i % 2], huge[i % 2]))
        done.set()

    sender = threading.Thread(target=send_huge)
    sender.start()
    during, deadline = [], time.monotonic() + 120
    while (not done.is_set() or len(during) < 5) and len(during) < 200 and time.monotonic() < deadline:
        during.append(timed_small())
    sender.join(timeout=120)
    assert len(refused) == 6 and len(during) >= 5
    for response in refused:
        assert_error(response, 400, None, "context_length_exceeded")
    assert max(during) < before + 1.0, (before, sorted(during)[-3:])
    assert server.rss_bytes() < 1.1 * memory, (memory, server.rss_bytes())


def test_responses_validate_against_openai_schemas(server):
    client = server.client()
    response = _post(server, CHAT, chat(temperature=0, max_tokens=8, n=2))
    assert_openai(response.json(), "CreateChatCompletionResponse")
    assert response.json()["choices"][0]["message"]["refusal"] is None
    broken = json.loads(response.text)
    del broken["choices"][0]["message"]["refusal"]
    with pytest.raises(jsonschema.ValidationError, match="refusal"):  # the schema check can fail
        assert_openai(broken, "CreateChatCompletionResponse")
    with httpx.stream("POST", f"{server.url}{CHAT}", headers=AUTH, timeout=60,
                      json=chat(temperature=0, max_tokens=8, stream=True, stream_options={"include_usage": True})) as stream:  # fmt: skip
        chunks = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
    for chunk in chunks:
        assert_openai(chunk, "CreateChatCompletionStreamResponse")
    assert_openai(_post(server, COMPLETIONS, completion(max_tokens=4)).json(), "CreateCompletionResponse")
    with httpx.stream("POST", f"{server.url}{COMPLETIONS}", headers=AUTH, json=completion(max_tokens=4, stream=True), timeout=60) as stream:
        chunks = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
    assert_openai(chunks[-1], "CreateCompletionResponse")
    for chunk in chunks[:-1]:  # as OpenAI streams them: finish_reason null until the last (the schema, shared with
        assert [c["finish_reason"] for c in chunk["choices"]] == [None]  # the whole response, has no null)
        assert_openai({**chunk, "choices": [{**chunk["choices"][0], "finish_reason": "length"}]}, "CreateCompletionResponse")
    assert_openai(client.models.list().model_dump(), "ListModelsResponse")
    accepted = chat(max_tokens=2, user="u1", metadata={"k": "v"}, store=False, tools=[], tool_choice="none", frequency_penalty=0,
                    logit_bias={}, response_format={"type": "text"}, parallel_tool_calls=True, seed=-5, stop=None,
                    messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "refusal": None,
                              "tool_calls": None}, {"role": "user", "content": [{"type": "text", "text": "ok"}]}])  # fmt: skip
    assert _post(server, CHAT, accepted).status_code == 200


def test_constants_match_the_library():
    assert MAX_BODY_BYTES == app.MAX_BODY_BYTES
    assert {"openapi", "components", "source", "license"} <= set(SCHEMAS)


def test_api_key_sources(tmp_path, monkeypatch):
    def key(api_key=None, api_key_file=None):
        return api_key_from(argparse.Namespace(api_key=api_key, api_key_file=api_key_file))

    monkeypatch.delenv("DAMI_JAX_API_KEY", raising=False)
    assert key() is None and key("k1") == "k1"
    monkeypatch.setenv("DAMI_JAX_API_KEY", "from-env")
    assert key() == "from-env" and key("k1") == "k1"
    (tmp_path / "key").write_text("from-file\n")
    assert key(api_key_file=str(tmp_path / "key")) == "from-file"
    (tmp_path / "empty").write_text("")
    for bad in (dict(api_key="a", api_key_file=str(tmp_path / "key")), dict(api_key_file=str(tmp_path / "empty")),
                dict(api_key_file=str(tmp_path / "none")), dict(api_key="two words")):  # fmt: skip
        with pytest.raises(InputError):
            key(**bad)
