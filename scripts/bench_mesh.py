"""The engine on a mesh (issue 28's benchmarks), in one run:

1. Engine tok/s on 1 device against a tensor-parallel mesh of 4 (on a CPU: 4 virtual devices
   carved out of the same cores, so this shows the mesh's overhead, not a speed-up), on the toy
   pair and on a tiny random Qwen3-MoE pair: the same requests, mixed lambdas, greedy, float32.
2. A projection, not a measurement, of Qwen3-30B-A3B's decode step (the -Instruct-2507 /
   -Thinking-2507 pair) on one and on four H100s, from the bytes a step must read:

       bytes = 2 * (attention + head + layers * experts_touched(B) * expert) [weights, bf16]
               + B * context * kv_per_token                                   [KV cache, bf16]
       experts_touched(B) = E * (1 - (1 - k / E) ** B)   (B tokens routed uniformly, k of E each)
       time(1 GPU) = bytes / HBM bandwidth
       time(4 GPUs) = bytes / 4 / HBM bandwidth + layers * 2 * all-reduce latency

   A step with mixed lambdas reads both endpoints' weights (twice the weight bytes); a row where
   the weights and the KV cache do not fit in the GPUs' memory says so. The shapes
   are the model's config.json; HBM bandwidth and the all-reduce latency are stated assumptions
   (H100 SXM: 3.35 TB/s; 15 us per small NVLink all-reduce), printed with the table.
3. TailorKV's token selection on a mesh that splits the KV heads over 2 devices: ``largest``
   (TopK per device on its own heads, in a shard_map) against ``jax.lax.top_k`` on the split
   scores (XLA gathers every head's scores onto every device first), on scores [8 rows, 8 heads,
   32768 tokens], k = 128 (TailorKV-1) and 896 (TailorKV-2).

    python scripts/bench_mesh.py [--requests 24] [--new-tokens 32]
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # before jax is imported
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import dami_jax as dj  # noqa: E402
from dami_jax.dami.pair import ModelPair  # noqa: E402
from dami_jax.engine.engine import Engine  # noqa: E402
from dami_jax.evals.prompts import prompt_tokens  # noqa: E402
from dami_jax.models.checkpoint import save_hf_checkpoint  # noqa: E402
from dami_jax.models.config import ModelConfig  # noqa: E402
from dami_jax.tailorkv.layers import largest  # noqa: E402
from dami_jax.toy.evaluation import toy_problems  # noqa: E402
from dami_jax.toy.pair import toy_pair_paths  # noqa: E402

LAMBDAS = (0.0, 1.0, 0.3, 0.5, 0.8)
HBM_BYTES_PER_S = 3.35e12  # H100 SXM
ALL_REDUCE_S = 15e-6  # one small all-reduce over NVLink (latency-bound at decode sizes)
H100_BYTES = 80e9
QWEN3_30B_A3B = ModelConfig(architecture="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=48,
                            num_heads=32, num_kv_heads=4, head_dim=128, num_experts=128, experts_per_token=8,
                            moe_intermediate_size=768, norm_topk_prob=True)  # fmt: skip


def moe_pair(folder: Path) -> ModelPair:
    """The toy pair's shapes as a random Qwen3-MoE pair (8 experts, 2 per token), with its tokenizers."""
    toy = dj.load_toy_pair()
    cfg = dataclasses.replace(toy.cfg, architecture="qwen3_moe", num_experts=8, experts_per_token=2,
                              moe_intermediate_size=toy.cfg.intermediate_size // 2, norm_topk_prob=True)  # fmt: skip
    paths = []
    for seed, name in enumerate(("instruct", "thinking")):
        path = folder / name
        save_hf_checkpoint(path, cfg, dj.init_params(cfg, jax.random.key(seed), scale=0.1))
        toy.tokenizers[name].save_pretrained(path)
        paths.append(path)
    return dj.load_pair(*paths)


def tokens_per_second(pair: ModelPair, requests, mesh) -> tuple[float, list]:
    engine = Engine(pair, slots=8, max_len=256, mesh=mesh)
    engine.warmup()
    for prompt, lam, budget in requests:
        engine.submit(prompt, lam=lam, max_new_tokens=budget, stop_tokens=[])
    started = time.perf_counter()
    results = sorted(engine.run(), key=lambda r: r.id)
    elapsed = time.perf_counter() - started
    return sum(len(r.tokens) for r in results) / elapsed, [list(r.tokens) for r in results]


def measured(args: argparse.Namespace) -> None:
    print(f"engine tok/s, 8 slots, {args.requests} requests x {args.new_tokens} tokens at lambdas {LAMBDAS}, "
          f"jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} devices)")  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        for name, pair in (("toy pair", dj.load_pair(*toy_pair_paths())), ("tiny Qwen3-MoE pair", moe_pair(Path(folder)))):
            tokenizer = pair.tokenizers["thinking"]
            prompts = [prompt_tokens(tokenizer, p, "toy") for p in toy_problems(4, seed=3)][: args.requests]
            requests = [(p, LAMBDAS[i % len(LAMBDAS)], args.new_tokens) for i, p in enumerate(prompts)]
            one, tokens_one = tokens_per_second(pair, requests, None)
            four, tokens_four = tokens_per_second(pair, requests, dj.make_mesh())
            same = "same tokens" if tokens_one == tokens_four else "TOKENS DIFFER"
            print(f"  {name:<20} 1 device {one:8.1f} tok/s | mesh of 4 {four:8.1f} tok/s ({four / one:.2f}x; {same})")


def projected(cfg: ModelConfig) -> None:
    attention = cfg.num_layers * cfg.hidden_size * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    head = cfg.vocab_size * cfg.hidden_size
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    print(f"\nprojection (not measured): Qwen3-30B-A3B decode step, bf16; attention {attention / 1e9:.2f}B, head "
          f"{head / 1e9:.2f}B, {cfg.num_experts} experts of {expert / 1e6:.2f}M per layer, {cfg.experts_per_token} per token; "
          f"KV {kv_per_token / 1024:.0f} KiB per token; HBM {HBM_BYTES_PER_S / 1e12:.2f} TB/s, all-reduce {ALL_REDUCE_S * 1e6:.0f} us")  # fmt: skip
    model = 2 * (attention + 2 * head + cfg.num_layers * cfg.num_experts * expert)  # every weight, embeddings included
    print(f"memory: one endpoint's weights {model / 1e9:.1f} GB; a step fits where weights + KV <= {H100_BYTES / 1e9:.0f} GB per GPU "
          "(the mixed-lambda column keeps both endpoints)")  # fmt: skip
    print("| tokens in the step | context | experts touched per layer | GB read | 1 H100 ms | 4 H100 ms | 4 H100 ms, mixed lambdas |")
    print("|---|---|---|---|---|---|---|")
    for batch in (1, 8, 32):
        for context in (8192, 32768):
            touched = cfg.num_experts * (1 - (1 - cfg.experts_per_token / cfg.num_experts) ** batch)
            weights = 2 * (attention + head + cfg.num_layers * touched * expert)
            kv = batch * context * kv_per_token
            one = (weights + kv) / HBM_BYTES_PER_S
            four = (weights + kv) / 4 / HBM_BYTES_PER_S + cfg.num_layers * 2 * ALL_REDUCE_S
            mixed = (2 * weights + kv) / 4 / HBM_BYTES_PER_S + cfg.num_layers * 2 * ALL_REDUCE_S

            def shown(ms: float, endpoints: int, gpus: int) -> str:
                return f"{ms * 1e3:.1f}" if endpoints * model + kv <= gpus * H100_BYTES else "does not fit"

            print(f"| {batch} | {context} | {touched:.1f} | {(weights + kv) / 1e9:.1f} | {shown(one, 1, 1)} | {shown(four, 1, 4)} | "
                  f"{shown(mixed, 2, 4)} |")  # fmt: skip


def selection() -> None:
    mesh = dj.make_mesh(jax.devices()[:2])
    scores = jax.device_put(jax.random.normal(jax.random.key(0), (8, 8, 32768)), NamedSharding(mesh, P(None, "tp")))
    print("\nTailorKV's token selection, scores [8, 8, 32768] split over 2 devices by head (ms per call, 10 calls):")
    for k in (128, 896):
        times = {}
        for name, select in (("gathered top_k", lambda x: jax.lax.top_k(x, k)), ("largest", lambda x: largest(x, k, mesh))):
            jitted = jax.jit(select)
            jax.block_until_ready(jitted(scores))
            started = time.perf_counter()
            for _ in range(10):
                jax.block_until_ready(jitted(scores))
            times[name] = (time.perf_counter() - started) / 10
        print(f"  k={k}: gathered top_k {times['gathered top_k'] * 1e3:.1f} ms | largest {times['largest'] * 1e3:.1f} ms "
              f"({times['gathered top_k'] / times['largest']:.2f}x faster)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    measured(args)
    projected(QWEN3_30B_A3B)
    selection()


if __name__ == "__main__":
    main()
