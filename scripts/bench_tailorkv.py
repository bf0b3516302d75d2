"""TailorKV vs the dense cache (and transformers' quanto QuantizedCache): device-resident KV bytes
and decode time per token at long contexts, SmolLM2-135M in float32, batch 1.

    python scripts/bench_tailorkv.py [--contexts 8192 32768] [--steps 8] [--skip-quanto]

Decode cost does not depend on what the cache holds, so each cache is filled with random K/V of
the right shapes instead of a real prefill (a 32k prefill would dominate the run on a CPU); the
sparse layers' prompt K/V sit in host memory (``pinned_host``) as in real use. Quality lives in
``dami-jax niah``. Timings are the median of ``--steps`` single-token decode steps after warm-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

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


def quanto_row(path: str, context: int, steps: int, nbits: int = 2) -> tuple[float, float]:
    """transformers + optimum-quanto QuantizedCache(nbits) filled with random K/V: (MB on device, s/token)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.cache_utils import QuantizedCache

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = model.config
    cache = QuantizedCache(backend="quanto", config=cfg, nbits=nbits, q_group_size=64, residual_length=128)
    generator = torch.Generator().manual_seed(0)
    shape = (1, cfg.num_key_value_heads, context, cfg.head_dim)
    for layer in range(cfg.num_hidden_layers):
        cache.update(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator), layer)
    stored = 0
    for layer in cache.layers:
        for qtensor in (layer._quantized_keys, layer._quantized_values):
            inner, _ = qtensor.__tensor_flatten__()
            stored += sum(_tensor_bytes(getattr(qtensor, name)) for name in inner)
        stored += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None and t.dim() == 4)
    token = torch.tensor([[42]])
    positions = iter(range(context, context + steps + 1))

    def one_step():
        position = torch.tensor([next(positions)])
        return model(input_ids=token, past_key_values=cache, cache_position=position, position_ids=position[None], use_cache=True)

    with torch.no_grad():
        times = call_times(one_step, steps)
    return stored / 1e6, statistics.median(times)


def _tensor_bytes(t) -> int:
    if hasattr(t, "__tensor_flatten__"):
        inner, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, name)) for name in inner)
    return t.numel() * t.element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip-quanto", action="store_true")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and K/V (bfloat16: the GPU mode)")
    args = parser.parse_args()

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
    print(f"SmolLM2-135M {args.dtype}, batch 1, jax {jax.__version__} on {jax.devices()[0].platform}; "
          f"quantized layers {layers}\n")  # fmt: skip
    print(f"{'context':>7}  {'cache':<12} {'device KV MB':>12}  {'host KV MB':>10}  {'ms/token':>9}  {'moved/step MB':>13}")
    results = {}
    for context in args.contexts:
        dense = random_dense_cache(cfg, context, new_tokens=args.steps + 2, dtype=args.dtype)
        for name, config in configs.items():
            cache = jax.jit(config.after_prefill, static_argnums=(0, 2))(cfg, dense, context)
            on_device, on_host = cache_bytes(cache)
            seconds = time_decode(params, cfg, cache, args.steps)
            moved = bytes_moved_per_step(cfg, config, 1, context, jnp.dtype(args.dtype).itemsize) if name != "dense" else 0
            results[(context, name)] = (on_device, seconds)
            print(f"{context:7d}  {name:<12} {on_device / 1e6:12.1f}  {on_host / 1e6:10.1f}  {seconds * 1e3:9.1f}  {moved / 1e6:13.2f}")
        if not args.skip_quanto:
            mb, seconds = quanto_row(str(path), context, args.steps)
            results[(context, "quanto-2")] = (mb * 1e6, seconds)
            print(f"{context:7d}  {'quanto-2 (HF)':<12} {mb:12.1f}  {0:10.1f}  {seconds * 1e3:9.1f}  {0:13.2f}")
    print()
    for context in args.contexts:
        dense_bytes, dense_time = results[(context, "dense")]
        for name in [n for c, n in results if c == context and n != "dense"]:
            b, t = results[(context, name)]
            print(f"{context:7d} {name:<14} device KV {dense_bytes / b:6.1f}x smaller than dense; decode {t / dense_time:5.2f}x dense time")


if __name__ == "__main__":
    main()
