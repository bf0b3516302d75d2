"""Log-probs over HTTP, streamed and not, in OpenAI's shapes: every value equals the log-softmax
of ``dj.forward`` on theta(lambda) at its position, and the alternatives are the likeliest tokens
there; ``echo`` adds the prompt's own (as log-likelihood harnesses ask)."""

from __future__ import annotations

import json

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from serving import KEY, assert_openai
from serving import pair, server  # noqa: F401 - the fixtures

import dami_jax as dj
from dami_jax.models.tokenizer import chat_tokens

pytestmark = pytest.mark.xdist_group("server")

AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTION = "a=7, b=a*2, c=b-3. c=?"
TOLERANCE = 1e-4  # theta(lambda) materialized (the reference) vs. mixed per weight op (the server)


def reference(pair, lam: float, tokens: list[int]) -> np.ndarray:
    """float [len(tokens), vocab]: row i is log p(. | tokens[: i + 1]) on theta(lam)."""
    theta = dj.interpolate(pair.instruct, pair.thinking, lam)
    return np.asarray(jax.nn.log_softmax(dj.forward(theta, pair.cfg, jnp.asarray([tokens]))[0]))


def greedy(pair, lam: float, prompt: list[int], max_tokens: int) -> list[int]:
    theta = dj.interpolate(pair.instruct, pair.thinking, lam)
    return dj.generate(theta, pair.cfg, [prompt], max_new_tokens=max_tokens).token_lists()[0]


def post(server, path: str, body: dict) -> dict:
    response = httpx.post(f"{server.url}{path}", json={"model": "dami-toy", **body}, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def stream(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.url}{path}", json={"model": "dami-toy", "stream": True, **body}, headers=AUTH,
                      timeout=120) as response:  # fmt: skip
        assert response.status_code == 200
        return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


def assert_echo_valid(body: dict) -> None:
    """Valid under OpenAI's schema, but for the echoed prompt's first token: OpenAI's API (and
    vLLM's) give it null log-probs, which the published schema, with numbers only, leaves out."""
    choices = []
    for choice in body["choices"]:
        logprobs = choice["logprobs"]
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        rest = {**logprobs, "token_logprobs": logprobs["token_logprobs"][1:], "top_logprobs": logprobs["top_logprobs"][1:]}
        choices.append({**choice, "logprobs": rest})
    assert_openai({**body, "choices": choices}, "CreateCompletionResponse")


def check_top(top_tokens: list[str], top_values: list[float], row: np.ndarray, spell) -> None:
    """The alternatives are the likeliest tokens at that position, best first, with their log-probs."""
    order = np.argsort(-row, kind="stable")[: len(top_values)]
    np.testing.assert_allclose(top_values, row[order], atol=TOLERANCE)
    assert sorted(top_tokens) == sorted(spell(int(t)) for t in order)


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_chat_logprobs_equal_forward_on_theta(server, pair, lam):
    tokenizer = pair.tokenizers["thinking"]
    prompt = chat_tokens(tokenizer, QUESTION)
    answer = greedy(pair, lam, prompt, 40)
    rows = reference(pair, lam, prompt + answer)
    body = {"messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 40, "lambda": lam,
            "logprobs": True, "top_logprobs": 3}  # fmt: skip
    whole = post(server, "/v1/chat/completions", body)
    assert_openai(whole, "CreateChatCompletionResponse")
    content = whole["choices"][0]["logprobs"]["content"]
    assert len(content) == len(answer) and whole["choices"][0]["logprobs"]["refusal"] is None
    for i, (entry, token) in enumerate(zip(content, answer)):
        row = rows[len(prompt) + i - 1]
        assert entry["token"] == tokenizer.decode([token]) and bytes(entry["bytes"]) == entry["token"].encode()
        np.testing.assert_allclose(entry["logprob"], row[token], atol=TOLERANCE)
        top = entry["top_logprobs"]
        assert len(top) == 3 and top[0]["token"] == entry["token"]  # greedy: the chosen token is the likeliest
        check_top([t["token"] for t in top], [t["logprob"] for t in top], row, lambda t: tokenizer.decode([t]))

    chunks = stream(server, "/v1/chat/completions", body)
    for chunk in chunks:
        assert_openai(chunk, "CreateChatCompletionStreamResponse")
    streamed = [entry for chunk in chunks for entry in chunk["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    np.testing.assert_allclose([e["logprob"] for e in streamed], [e["logprob"] for e in content], atol=1e-6)
    for chunk in chunks:  # each chunk's log-probs are those of the tokens its text stands on
        text = chunk["choices"][0]["delta"].get("content") or ""
        assert "".join(e["token"] for e in chunk["choices"][0]["logprobs"]["content"]).startswith(text)


def test_completion_logprobs_with_echo_equal_forward_on_theta(server, pair):
    tokenizer, lam, text = pair.tokenizers["thinking"], 0.3, "a=3, b=a+4. b=?"
    prompt = tokenizer.encode(text)
    answer = greedy(pair, lam, prompt, 12)
    rows = reference(pair, lam, prompt + answer)
    body = {"prompt": text, "temperature": 0, "max_tokens": 12, "lambda": lam, "logprobs": 2, "echo": True}
    whole = post(server, "/v1/completions", body)
    assert_echo_valid(whole)
    choice = whole["choices"][0]
    logprobs, tokens = choice["logprobs"], prompt + answer
    completion_text = tokenizer.decode(answer, skip_special_tokens=True)
    assert choice["text"] == text + completion_text
    assert logprobs["tokens"] == [tokenizer.decode([t]) for t in tokens]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None  # nothing predicts the first
    for i in range(1, len(tokens)):
        np.testing.assert_allclose(logprobs["token_logprobs"][i], rows[i - 1][tokens[i]], atol=TOLERANCE)
        top = logprobs["top_logprobs"][i]
        assert 2 <= len(top) <= 3 and top[logprobs["tokens"][i]] == logprobs["token_logprobs"][i]  # top 2 + the chosen
        best = sorted(top.items(), key=lambda kv: -kv[1])[:2]
        check_top([t for t, _ in best], [v for _, v in best], rows[i - 1], lambda t: tokenizer.decode([t]))
    for token, offset in zip(logprobs["tokens"], logprobs["text_offset"]):
        if offset < len(choice["text"]):
            assert choice["text"][offset : offset + len(token)] == token

    chunks = stream(server, "/v1/completions", body)
    assert chunks[0]["choices"][0]["text"] == text  # the echo opens the stream
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    streamed = {key: [v for c in chunks for v in c["choices"][0]["logprobs"][key]] for key in logprobs}
    assert streamed["tokens"] == logprobs["tokens"] and streamed["text_offset"] == logprobs["text_offset"]
    np.testing.assert_allclose(np.array(streamed["token_logprobs"][1:]), np.array(logprobs["token_logprobs"][1:]), atol=1e-6)


def test_scoring_a_tokenized_prompt_alone(server, pair):
    """What lm-evaluation-harness's local-completions sends for log-likelihoods: token ids, echo,
    one token or none to generate."""
    prompt = pair.tokenizers["instruct"].encode("x=4, y=x+5. y=9")
    rows = reference(pair, 1.0, prompt)
    for max_tokens in (0, 1):
        body = {"prompt": [prompt], "temperature": 0, "max_tokens": max_tokens, "lambda": 1.0, "logprobs": 1, "echo": True}
        response = post(server, "/v1/completions", body)
        assert_echo_valid(response)
        choice = response["choices"][0]
        scored = choice["logprobs"]["token_logprobs"]
        assert len(scored) == len(prompt) + max_tokens  # the generated token (an end-of-turn too) is scored
        assert choice["finish_reason"] == "length" if max_tokens == 0 else choice["finish_reason"] in ("stop", "length")
        np.testing.assert_allclose(scored[1 : len(prompt)], [rows[i - 1][prompt[i]] for i in range(1, len(prompt))], atol=TOLERANCE)
    logprobs_off = post(server, "/v1/completions", {"prompt": "x=1. x=?", "max_tokens": 2, "echo": True})["choices"][0]
    assert logprobs_off["logprobs"] is None and logprobs_off["text"].startswith("x=1. x=?")
