"""``dami-jax serve`` as users run it: a real server process on 127.0.0.1 and a free port, the toy
pair, the official ``openai`` client. Every load loop here is bounded in count and time."""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import write_tiny_pair
from serving import HOST, KEY, Server
from serving import pair, server  # noqa: F401 - the fixtures

import dami_jax as dj
from dami_jax.evals.calibration import pair_quantized_layers
from dami_jax.models.tokenizer import chat_tokens
from dami_jax.toy.evaluation import toy_problems

pytestmark = pytest.mark.xdist_group("server")  # the servers of this folder start once, in one worker


QUESTIONS = [p.question for p in toy_problems(6, seed=3)][:32]
LAMBDAS = [0.0, 1.0, 0.5, 0.3, 0.7, 1.0, 0.0, 0.9]


def expected_text(pair, question: str, lam: float, max_tokens: int, cache=dj.DenseCacheConfig()) -> tuple[str, int, int]:
    """(text, prompt tokens, completion tokens) of dj.generate on theta(lam) for this prompt alone."""
    prompt = chat_tokens(pair.tokenizers["thinking"], question)
    theta = dj.interpolate(pair.instruct, pair.thinking, lam)
    row = dj.generate(theta, pair.cfg, [prompt], max_new_tokens=max_tokens, cache=cache).token_lists()[0]
    return pair.tokenizers["thinking"].decode(row, skip_special_tokens=True), len(prompt), len(row)


def test_ready_line_names_the_address(server):
    assert f"http://{HOST}:{server.port}/v1" in server.ready and "4 slots" in server.ready


def test_32_concurrent_chat_requests_each_equal_generate_alone(server, pair):
    client = server.client()

    def ask(i: int):
        lam = LAMBDAS[i % len(LAMBDAS)]
        response = client.chat.completions.create(model="dami-toy", messages=[{"role": "user", "content": QUESTIONS[i]}],
                                                  temperature=0, max_tokens=80, extra_body={"lambda": lam})  # fmt: skip
        return lam, response

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    for i, (lam, response) in enumerate(answers):
        text, prompt_tokens, completion_tokens = expected_text(pair, QUESTIONS[i], lam, 80)
        assert response.choices[0].message.content == text
        assert response.usage.prompt_tokens == prompt_tokens and response.usage.completion_tokens == completion_tokens
        assert response.usage.total_tokens == prompt_tokens + completion_tokens
        assert response.model_extra["lambda"] == lam
    assert {r.choices[0].finish_reason for _, r in answers} <= {"stop", "length"}


def test_streaming_gives_the_same_text(server):
    client = server.client()
    for lam in (0.0, 0.6):
        options = dict(model="dami-toy", messages=[{"role": "user", "content": QUESTIONS[5]}], temperature=0, max_tokens=80,
                       extra_body={"lambda": lam})  # fmt: skip
        whole = client.chat.completions.create(**options)
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **options))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        assert all(c.model_extra["lambda"] == lam for c in chunks)
    prompt = "a=3, b=a+4. b=?"
    whole = client.completions.create(model="dami-toy", prompt=prompt, temperature=0, max_tokens=24, extra_body={"lambda": 1.0})
    pieces = client.completions.create(model="dami-toy", prompt=prompt, temperature=0, max_tokens=24, stream=True,
                                       extra_body={"lambda": 1.0})  # fmt: skip
    assert "".join(c.choices[0].text for c in pieces) == whole.choices[0].text
    assert whole.usage.completion_tokens <= 24


def test_sampling_seed_n_and_stop(server):
    client = server.client()
    options = dict(model="dami-toy", messages=[{"role": "user", "content": QUESTIONS[7]}], temperature=1.0, top_p=0.9,
                   max_tokens=40, n=3, seed=11, extra_body={"lambda": 0.5})  # fmt: skip
    first, again = client.chat.completions.create(**options), client.chat.completions.create(**options)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]  # seeded
    assert len(first.choices) == 3 and [c.index for c in first.choices] == [0, 1, 2]
    greedy = client.chat.completions.create(model="dami-toy", messages=[{"role": "user", "content": QUESTIONS[7]}],
                                            temperature=0, max_tokens=80, extra_body={"lambda": 1.0})  # fmt: skip
    text = greedy.choices[0].message.content
    stop = text[len(text) // 3 : len(text) // 3 + 2]
    cut = client.chat.completions.create(model="dami-toy", messages=[{"role": "user", "content": QUESTIONS[7]}],
                                         temperature=0, max_tokens=80, stop=[stop], extra_body={"lambda": 1.0})  # fmt: skip
    assert cut.choices[0].message.content == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_reasoning_effort_maps_to_lambdas(server):
    client = server.client()
    for effort, lam in (("minimal", 0.0), ("low", 0.3), ("medium", 0.6), ("high", 1.0)):
        response = client.chat.completions.create(model="dami-toy", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                                  temperature=0, max_tokens=8, reasoning_effort=effort)  # fmt: skip
        assert response.model_extra["lambda"] == lam
    default = client.chat.completions.create(model="dami-toy", messages=[{"role": "user", "content": "x=1. x=?"}], max_tokens=4)
    assert default.model_extra["lambda"] == 0.6  # no lambda, no router: medium


def test_a_key_is_required_when_set(server):
    """The fixture's server took its key from DAMI_JAX_API_KEY."""
    for key in ("wrong", None):
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        response = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=10)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").models.list()
    assert [m.id for m in server.client().models.list().data] == ["dami-toy"]


def test_metrics_and_health(server):
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for name in ("dami_queue_depth", "dami_busy_slots", "dami_generated_tokens_total", "dami_time_to_first_token_seconds_bucket",
                 "dami_request_latency_seconds_count", 'dami_kv_cache_bytes{memory="device",state="in_use"}'):  # fmt: skip
        assert name in text, name
    assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"


def test_a_client_that_goes_away_frees_its_slot(server):
    cancelled = server.metric('dami_requests_total{outcome="cancelled"}')
    body = {"model": "dami-toy", "messages": [{"role": "user", "content": QUESTIONS[1]}], "max_tokens": 470, "stream": True,
            "ignore_eos": True, "temperature": 0, "lambda": 1.0}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as response:  # fmt: skip
        lines = response.iter_lines()
        assert [next(lines) for _ in range(6)]  # a few tokens in, then hang up
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (server.metric("dami_busy_slots") > 0 or server.metric('dami_requests_total{outcome="cancelled"}') == cancelled):
        time.sleep(0.05)
    assert server.metric("dami_busy_slots") == 0
    assert server.metric('dami_requests_total{outcome="cancelled"}') == cancelled + 1


def _long_stream(server: Server, budget: int = 470):
    body = {"model": "dami-toy", "messages": [{"role": "user", "content": QUESTIONS[2]}], "max_tokens": budget,
            "stream": True, "ignore_eos": True, "temperature": 0, "lambda": 0.5}  # fmt: skip
    return httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120)


def _chunks(response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


def eight_answers_at_mixed_lambdas(server: Server, model: str, max_tokens: int) -> list[str]:
    """The texts of 8 greedy chat requests sent at once, question i at LAMBDAS[i]."""
    client = server.client()

    def ask(i: int) -> str:
        response = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTIONS[i]}],
                                                  temperature=0, max_tokens=max_tokens, extra_body={"lambda": LAMBDAS[i]})  # fmt: skip
        return response.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(ask, range(8)))


def test_a_tailorkv_server_answers_concurrent_requests_as_generate_does_alone(pair):
    tailorkv = Server("--slots", "4", "--cache", "tailorkv-1", "--max-new-tokens", "40")
    try:
        assert "tailorkv-1 cache" in tailorkv.ready
        answers = eight_answers_at_mixed_lambdas(tailorkv, "dami-toy", 40)
        layers = pair_quantized_layers(pair.paths, pair.cfg.num_layers)  # the toy pair's profiles: every layer dense
        config = dataclasses.replace(dj.TAILORKV_1, quantized_layers=layers, group=pair.cfg.head_dim)  # 32: the toy's heads
        for i, answer in enumerate(answers):
            assert answer == expected_text(pair, QUESTIONS[i], LAMBDAS[i], 40, config)[0]
        device, host = (tailorkv.metric(f'dami_kv_cache_bytes{{memory="{memory}",state="allocated"}}') for memory in ("device", "host"))
        assert host > device > 0  # 1-bit device KV; the full-precision prompts in host memory
        too_long = httpx.post(f"{tailorkv.url}/v1/chat/completions", timeout=30, json={
            "model": "dami-toy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 41})  # fmt: skip
        assert too_long.status_code == 400 and "limit of 40 tokens per answer" in too_long.json()["error"]["message"]
    finally:
        tailorkv.stop()


def test_a_mixture_of_experts_pair_answers_concurrent_requests_as_generate_does_alone(tmp_path_factory):
    """A tiny random Qwen3-MoE pair served on a mesh of the 4 virtual CPU devices (one expert per
    device, the KV cache replicated: 2 KV heads): rows at different lambdas decode together (the
    experts and the router mixed per row), each as its theta(lambda) does alone on one device."""
    paths = write_tiny_pair(tmp_path_factory, moe=True)
    moe = Server("--instruct", str(paths[0]), "--thinking", str(paths[1]), "--slots", "4", "--model-name", "dami-moe", "--mesh", "tp=4")
    try:
        answers = eight_answers_at_mixed_lambdas(moe, "dami-moe", 12)
        pair = dj.load_pair(*paths)
        assert pair.cfg.architecture == "qwen3_moe"
        for i, answer in enumerate(answers):
            assert answer == expected_text(pair, QUESTIONS[i], LAMBDAS[i], 12)[0]
    finally:
        moe.stop()


def test_a_full_queue_gets_429_and_sigterm_drains():
    small = Server("--slots", "1", "--max-queue", "1", "--steps-per-call", "1", "--drain-timeout", "60")
    try:
        with _long_stream(small) as first:
            lines = first.iter_lines()
            while '"content": "' not in next(lines).replace('"content": ""', ""):
                pass  # until its tokens come: it has the one slot (and ~470 tokens to go)
            with _long_stream(small) as second:  # queued behind it: the queue is full
                assert second.status_code == 200
                third = httpx.post(f"{small.url}/v1/chat/completions", timeout=30,
                                   json={"model": "dami-toy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})  # fmt: skip
                assert third.status_code == 429 and third.headers["Retry-After"] == "1"
                assert third.json()["error"]["code"] == "queue_full"
                small.process.send_signal(signal.SIGTERM)  # in flight: both streams; then nothing new
                rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
                second_chunks = _chunks(second)
        # Both ran to their budget (a chunk carries every token that came since the last one, so
        # under load the chunks are fewer than the tokens: their count says nothing).
        assert rest[-1]["choices"][0]["finish_reason"] == "length"  # the first stream ran to its end
        assert second_chunks[-1]["choices"][0]["finish_reason"] == "length"
        with pytest.raises(httpx.HTTPError):
            httpx.post(f"{small.url}/v1/completions", json={"model": "dami-toy", "prompt": "hi"}, timeout=10).raise_for_status()
        assert small.process.wait(timeout=60) == 0
    finally:
        small.stop()


def test_serve_checks_its_arguments_before_loading_models(tmp_path):
    busy = socket.socket()
    busy.bind((HOST, 0))
    busy.listen()
    port = str(busy.getsockname()[1])
    missing = ["--instruct", str(tmp_path / "no-model"), "--thinking", str(tmp_path / "no-model")]  # loading would fail
    (tmp_path / "empty-key").write_text("\n")
    processes = ["--coordinator", f"{HOST}:{port}", "--num-processes", "2", "--process-id", "0"]
    try:
        for args, fragment in ((["--router", str(tmp_path)], "not a router folder"), (["--port", "70000"], "--port 70000"),
                               (["--effort-map", str(tmp_path / "none.json")], "--effort-map"),
                               (["--slots", "0"], "--slots"), (["--port", port, *missing], f"--port {port}: cannot listen"),
                               (["--host", "no-such-host.invalid", *missing], "--host no-such-host.invalid"),
                               (["--api-key", "k", "--api-key-file", str(tmp_path / "empty-key")], "give one"),
                               (["--api-key-file", str(tmp_path / "empty-key")], "one word"),
                               (["--max-body-bytes", "0"], "--max-body-bytes"),
                               (["--router", "conf", *processes], "--router: a router runs the models outside the engine")):  # fmt: skip
            done = subprocess.run([sys.executable, "-m", "dami_jax.cli", "serve", "--host", HOST, *args], capture_output=True,
                                  text=True, timeout=60)  # fmt: skip
            assert done.returncode == 2 and fragment in done.stderr and "Traceback" not in done.stderr, done.stderr
            assert len(done.stderr.strip().splitlines()) == 1
    finally:
        busy.close()
    bad_map = tmp_path / "efforts.json"
    bad_map.write_text(json.dumps({"minimal": 0, "low": 0.2, "medium": 2}))
    done = subprocess.run([sys.executable, "-m", "dami_jax.cli", "serve", "--effort-map", str(bad_map)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "high missing" in done.stderr


def test_effort_map_from_a_route_eval_summary(tmp_path):
    from dami_jax.server.intensity import effort_map_from_summary

    summary = [{"method": "instruct", "accuracy": 0.3, "mean_tokens": 13, "mean_lambda": 0.0},
               {"method": "fixed-0.4", "accuracy": 0.6, "mean_tokens": 42, "mean_lambda": 0.4},
               {"method": "fixed-0.5", "accuracy": 0.96, "mean_tokens": 47, "mean_lambda": 0.5},
               {"method": "fixed-0.7", "accuracy": 0.99, "mean_tokens": 47.6, "mean_lambda": 0.7},
               {"method": "thinking", "accuracy": 0.99, "mean_tokens": 47.5, "mean_lambda": 1.0},
               {"method": "dami-pref", "accuracy": 0.99, "mean_tokens": 44, "mean_lambda": 0.6}]  # fmt: skip
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    # low: the cheapest at >= 0.53 accuracy (a third of the way from 0.3 to 0.99); medium: at >= 0.76;
    # high: the most accurate, fewer tokens breaking the tie; the router's entry is not a fixed lambda
    assert effort_map_from_summary(path) == {"minimal": 0.0, "low": 0.4, "medium": 0.5, "high": 1.0}
