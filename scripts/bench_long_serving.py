"""Long-context serving (issue 25): ``dami-jax serve`` on SmolLM2-135M-Instruct with concurrent
clients sending 4-8k-token prompts, dense slots against TailorKV slots: completion tokens/s, time to
first token, request latency, the device and host KV the server reports on ``/metrics``, and the
needles found.

    .venv/bin/python scripts/bench_long_serving.py [--clients 8] [--requests 16] [--caches dense tailorkv-1]

The prompts are ``dami-jax niah`` cases (a needle in as much haystack as fits in a length drawn
uniformly from ``--min-len`` to ``--max-len``, depths cycled), sent as token ids to
``/v1/completions``, streamed, greedy, with ``ignore_eos``: every answer is ``--max-tokens`` long.
Every server gets the same slots, ``--max-len`` and ``--max-new-tokens``; float32 on CPU. Peak KV
is the largest ``dami_kv_cache_bytes{state="in_use"}`` seen while polling ``/metrics`` during the
load (busy slots times what one slot holds); ``allocated`` is what the server holds for all slots.
Servers listen on 127.0.0.1 only; every load is bounded in requests and in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import httpx
import numpy as np
from bench_http import ROOT, Done, Server, load_with, percentile  # scripts/ is the script's own folder
from prometheus_client.parser import text_string_to_metric_families

from dami_jax.evals.niah.cases import build_niah, case_seed, needle_found
from dami_jax.evals.niah.run import DEPTHS
from dami_jax.models.pinned import smollm2_checkpoint
from dami_jax.models.tokenizer import load_tokenizer

POLL_S = 0.25


def kv_gauges(base: str) -> dict[tuple[str, str], float]:
    """``dami_kv_cache_bytes`` by (memory, state), from the server's ``/metrics``."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {(s.labels["memory"], s.labels["state"]): s.value
            for family in text_string_to_metric_families(text) if family.name == "dami_kv_cache_bytes"
            for s in family.samples}  # fmt: skip


async def load_watching_kv(server: Server, payloads: list[dict], clients: int, budget_s: float) -> tuple[list[Done], float, dict]:
    """The load, with ``/metrics`` polled meanwhile: the largest value of every KV gauge."""
    base = server.url.removesuffix("/v1")
    peak: dict[tuple[str, str], float] = {}
    running = True

    async def watch():
        while running:
            for key, value in (await asyncio.to_thread(kv_gauges, base)).items():
                peak[key] = max(peak.get(key, 0.0), value)
            await asyncio.sleep(POLL_S)

    watcher = asyncio.create_task(watch())
    try:
        done, wall = await load_with(server.url, payloads, clients, budget_s, "completions")
    finally:
        running = False
        await watcher
    return done, wall, peak


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--caches", nargs="+", choices=("dense", "tailorkv-1", "tailorkv-2"), default=["dense", "tailorkv-1"])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--min-len", type=int, default=4096, help="shortest prompt + answer, tokens")
    ap.add_argument("--max-len", type=int, default=8192, help="longest prompt + answer, tokens (the server's --max-len)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (the server's --max-new-tokens)")
    ap.add_argument("--budget-s", type=float, default=1800.0, help="stop sending new requests after this long, per server")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=8712)
    args = ap.parse_args(argv)
    if not 0 < args.min_len <= args.max_len or args.max_tokens >= args.min_len:
        ap.error("--min-len must be positive, at most --max-len, and above --max-tokens")

    folder = smollm2_checkpoint()
    tokenizer = load_tokenizer(folder)
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.min_len, args.max_len + 1, args.requests)
    depths = [DEPTHS[i % len(DEPTHS)] for i in range(args.requests)]
    cases = [build_niah(tokenizer, int(n), d, case_seed(args.seed, int(n), d), reserve=args.max_tokens) for n, d in zip(lengths, depths)]
    payloads = [{"model": "dami-smollm2", "prompt": c.tokens, "max_tokens": args.max_tokens, "temperature": 0.0, "stream": True,
                 "ignore_eos": True, "lambda": 0.0} for c in cases]  # fmt: skip
    prompt_lens = [len(c.tokens) for c in cases]
    print(f"{args.requests} prompts of {min(prompt_lens)}-{max(prompt_lens)} tokens (mean {np.mean(prompt_lens):.0f}), "
          f"{args.max_tokens} generated each; {args.clients} clients, {args.slots} slots, max-len {args.max_len}", flush=True)  # fmt: skip

    dami = str(ROOT / ".venv" / "bin" / "dami-jax")
    rows = []
    for cache in args.caches:
        argv_ = [dami, "serve", "--instruct", "smollm2", "--thinking", "smollm2", "--dtype", "float32", "--slots", str(args.slots),
                 "--max-len", str(args.max_len), "--max-new-tokens", str(args.max_tokens), "--cache", cache,
                 "--max-queue", "256", "--host", "127.0.0.1", "--port", str(args.port), "--model-name", "dami-smollm2"]  # fmt: skip
        with Server(cache, argv_, args.port) as server:
            short = [{**payloads[0], "prompt": payloads[0]["prompt"][-512:], "max_tokens": 4}] * 2  # page cache, first-call costs
            asyncio.run(load_with(server.url, short, 2, 300, "completions"))
            done, wall, peak = asyncio.run(load_watching_kv(server, payloads, args.clients, args.budget_s))
        found = sum(needle_found(c.answer, d.text) for c, d in zip(cases, done))
        tokens = sum(d.max_tokens for d in done)
        row = {"cache": cache, "requests": len(done), "found": found, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
               "ttft_p50": percentile([d.ttft for d in done], 50), "ttft_p99": percentile([d.ttft for d in done], 99),
               "lat_p50": percentile([d.latency for d in done], 50), "lat_p99": percentile([d.latency for d in done], 99),
               **{f"kv_{memory}_{state}": peak.get((memory, state), 0.0) for memory in ("device", "host")
                  for state in ("allocated", "in_use")}}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    work = ROOT / "runs" / "bench_long_serving"
    work.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(json.dumps(rows, indent=1) + "\n")

    gb = 1e9
    print(f"\n| cache | requests | needles found | completion tok/s | TTFT p50 / p99 (s) | latency p50 / p99 (s) | "
          f"peak device KV in use (GB) | device KV allocated (GB) | host KV allocated (GB) | tok/s over {rows[0]['cache']} |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cache']} | {r['requests']} | {r['found']} | {r['tok_s']:.2f} | {r['ttft_p50']:.1f} / {r['ttft_p99']:.1f} | "
              f"{r['lat_p50']:.1f} / {r['lat_p99']:.1f} | {r['kv_device_in_use'] / gb:.3f} | {r['kv_device_allocated'] / gb:.3f} | "
              f"{r['kv_host_allocated'] / gb:.3f} | {r['tok_s'] / rows[0]['tok_s']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
