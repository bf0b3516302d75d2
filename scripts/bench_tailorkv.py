"""TailorKV vs the dense cache (and transformers' dense SDPA cache and quanto QuantizedCache):
device-resident KV bytes and decode time per token at long contexts, SmolLM2-135M in float32,
batch 1, each row set against the memory-bandwidth limit measured in the same run.

    python scripts/bench_tailorkv.py [--contexts 8192 32768] [--steps 8] [--hf-dense 8192] [--skip-quanto]
                                      [--torch-threads N]

Decode cost does not depend on what the cache holds, so each cache is filled with random K/V of
the right shapes instead of a real prefill (a 32k prefill would dominate the run on a CPU); the
sparse layers' prompt K/V sit in host memory (``pinned_host``) as in real use. Quality lives in
``dami-jax niah``. Timings are the median of ``--steps`` single-token decode steps after warm-up.

The limit: a step must read the weights and every KV byte it touches (the whole preallocated
dense cache; for TailorKV its device-resident bytes plus the host rows it moves; for quanto its
stored bytes), at best at the bandwidth of a plain memory copy, measured here as bytes read plus
bytes written per second by a numpy copy of a buffer far larger than the CPU caches (best of 5).
``x limit`` is the measured time over that bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import dami_jax as dj
from dami_jax.decoding.cache import DenseCacheConfig, DenseKVCache, cache_bytes
from dami_jax.decoding.generation import decode_step
from dami_jax.evals.calibration import quantized_layers_or_profile
from dami_jax.evals.timing import call_times
from dami_jax.models.pinned import smollm2_checkpoint
from dami_jax.tailorkv.cache import TAILORKV_1, TAILORKV_2, bytes_moved_per_step


def random_dense_cache(cfg, context: int, new_tokens: int, dtype: str = "float32") -> DenseKVCache:
    size = context + new_tokens
    keys = jax.random.split(jax.random.key(0), 2 * cfg.num_layers)
    shape = (1, cfg.num_kv_heads, size, cfg.head_dim)
    return DenseKVCache(
        k=tuple(jax.random.normal(k, shape, dtype) for k in keys[: cfg.num_layers]),
        v=tuple(jax.random.normal(k, shape, dtype) for k in keys[cfg.num_layers :]),
        length=jnp.asarray(context, jnp.int32),
        start=jnp.zeros((1,), jnp.int32),
    )


def time_decode(params, cfg, cache, steps: int) -> float:
    """Median seconds per decode step (the cache is donated: each step updates it in place)."""
    step = jax.jit(decode_step, static_argnums=1, donate_argnums=3)
    token = jnp.array([42], jnp.int32)
    state = {"cache": cache}

    def one_step():
        logits, state["cache"] = step(params, cfg, token, state["cache"])
        return logits

    return statistics.median(call_times(one_step, steps))


def memcpy_bandwidth(nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """Bytes read plus bytes written per second by a numpy copy of ``nbytes`` (best of ``repeats``)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - started)
    return 2 * src.nbytes / best


def hf_model(path: str, threads: int | None):
    """The checkpoint in transformers (torch CPU, float32, SDPA attention, ``threads`` threads)."""
    import torch
    from transformers import AutoModelForCausalLM

    if threads is not None:
        torch.set_num_threads(threads)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


def hf_decode_seconds(model, cache, context: int, steps: int) -> float:
    """Fill ``cache`` (a transformers Cache) with ``context`` random K/V tokens per layer; median
    seconds per single-token decode step on it."""
    import torch

    cfg = model.config
    generator = torch.Generator().manual_seed(0)
    shape = (1, cfg.num_key_value_heads, context, cfg.head_dim)
    for layer in range(cfg.num_hidden_layers):
        cache.update(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator), layer)
    token = torch.tensor([[42]])
    positions = iter(range(context, context + steps + 1))

    def one_step():
        position = torch.tensor([next(positions)])
        return model(input_ids=token, cache=cache, cache_position=position, position_ids=position[None], use_cache=True)

    with torch.no_grad():
        return statistics.median(call_times(one_step, steps))


def hf_dense_row(model, context: int, steps: int) -> tuple[int, float]:
    """transformers' default DynamicCache (full precision) with SDPA: (KV bytes, s/token)."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=model.config)
    seconds = hf_decode_seconds(model, cache, context, steps)
    stored = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return stored, seconds


def quanto_row(model, context: int, steps: int, nbits: int = 2) -> tuple[int, float]:
    """transformers + optimum-quanto QuantizedCache(nbits): (stored KV bytes, s/token)."""
    from transformers.cache_utils import QuantizedCache

    cache = QuantizedCache(backend="quanto", config=model.config, nbits=nbits, q_group_size=64, residual_length=128)
    seconds = hf_decode_seconds(model, cache, context, steps)
    stored = 0
    for layer in cache.layers:
        for qtensor in (layer._quantized_keys, layer._quantized_values):
            inner, _ = qtensor.__tensor_flatten__()
            stored += sum(_tensor_bytes(getattr(qtensor, name)) for name in inner)
        stored += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None and t.dim() == 4)
    return stored, seconds


def _tensor_bytes(t) -> int:
    if hasattr(t, "__tensor_flatten__"):
        inner, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, name)) for name in inner)
    return t.numel() * t.element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hf-dense", type=int, nargs="*", default=[8192], metavar="CONTEXT",
                        help="contexts (among --contexts) that get a transformers dense-cache (SDPA) row")  # fmt: skip
    parser.add_argument("--skip-quanto", action="store_true")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and K/V (bfloat16: the GPU mode)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="threads for the transformers rows (default: torch's; on shared cores 1 can be faster)")  # fmt: skip
    args = parser.parse_args()
    if min(args.contexts) < 1 or args.steps < 1 or (args.torch_threads is not None and args.torch_threads < 1):
        parser.error("--contexts, --steps and --torch-threads must be positive")
    if not set(args.hf_dense) <= set(args.contexts):
        parser.error(f"--hf-dense {args.hf_dense} must be among --contexts {args.contexts}")

    path = smollm2_checkpoint()
    cfg, params = dj.load_checkpoint(path, dtype=np.dtype(args.dtype))
    # Timing beyond the trained 8k positions is fine: RoPE extrapolates, and quality is not measured here.
    cfg = dataclasses.replace(cfg, max_position_embeddings=max(args.contexts) + 64)
    layers = quantized_layers_or_profile(path, cfg.num_layers)
    configs = {
        "dense": DenseCacheConfig(),
        "TailorKV-1": dataclasses.replace(TAILORKV_1, quantized_layers=layers),
        "TailorKV-2": dataclasses.replace(TAILORKV_2, quantized_layers=layers),
    }
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    bandwidth = memcpy_bandwidth()
    hf = hf_model(str(path), args.torch_threads) if args.hf_dense or not args.skip_quanto else None
    torch_note = f"; transformers rows on {_torch_threads()} torch threads" if hf is not None else ""
    print(f"SmolLM2-135M {args.dtype}, batch 1, jax {jax.__version__} on {jax.devices()[0].platform}; quantized layers "
          f"{layers}\nweights {weights / 1e6:.0f} MB; memcpy {bandwidth / 1e9:.1f} GB/s (read + written){torch_note}\n")  # fmt: skip
    print(f"{'context':>7}  {'cache':<14} {'device KV MB':>12}  {'host KV MB':>10}  {'moved/step MB':>13}  "
          f"{'read/step MB':>12}  {'limit ms':>8}  {'ms/token':>9}  {'x limit':>7}")  # fmt: skip
    results = {}

    def row(context, name, on_device, on_host, moved, seconds):
        read = weights + on_device + moved
        limit = read / bandwidth
        results[(context, name)] = (on_device, seconds)
        print(f"{context:7d}  {name:<14} {on_device / 1e6:12.1f}  {on_host / 1e6:10.1f}  {moved / 1e6:13.2f}  "
              f"{read / 1e6:12.0f}  {limit * 1e3:8.1f}  {seconds * 1e3:9.1f}  {seconds / limit:7.2f}", flush=True)  # fmt: skip

    for context in args.contexts:
        dense = random_dense_cache(cfg, context, new_tokens=args.steps + 2, dtype=args.dtype)
        for name, config in configs.items():
            cache = jax.jit(config.after_prefill, static_argnums=(0, 2))(cfg, dense, context)
            on_device, on_host = cache_bytes(cache)
            moved = bytes_moved_per_step(cfg, config, 1, context, jnp.dtype(args.dtype).itemsize) if name != "dense" else 0
            row(context, name, on_device, on_host, moved, time_decode(params, cfg, cache, args.steps))
        del dense, cache
        if context in args.hf_dense:
            row(context, "dense SDPA (HF)", *_kv_row(hf_dense_row(hf, context, args.steps)))
        if not args.skip_quanto:
            row(context, "quanto-2 (HF)", *_kv_row(quanto_row(hf, context, args.steps)))
    print()
    for context in args.contexts:
        dense_bytes, dense_time = results[(context, "dense")]
        for name in [n for c, n in results if c == context and n != "dense"]:
            b, t = results[(context, name)]
            print(f"{context:7d} {name:<16} device KV {dense_bytes / b:6.1f}x smaller than dense; decode {t / dense_time:5.2f}x dense time")


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _kv_row(stored_and_seconds: tuple[int, float]) -> tuple[int, int, int, float]:
    """(stored bytes, seconds) of a transformers cache as row fields: all on device, nothing moved."""
    stored, seconds = stored_and_seconds
    return stored, 0, 0, seconds


if __name__ == "__main__":
    main()
