"""Interpolation throughput: bytes moved per second by ``dj.interpolate`` (two reads, one write)
against a plain copy of the same number of bytes in the same run (numpy on a CPU; on an accelerator
a copy on the device, :func:`dami_jax.evals.timing.copy_times`), float32 and bf16, and the
projected lambda-switch time for Qwen3-4B in bf16 at the measured bandwidth.

    python scripts/bench_interpolate.py [--repeats 5]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import dami_jax as dj
from dami_jax.evals.timing import call_times, copy_times
from dami_jax.models.config import ModelConfig

# SmolLM2-135M's shapes: big enough to leave the caches, small enough for 2 cores.
BENCH_CONFIG = ModelConfig(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                           num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True)  # fmt: skip
QWEN3_4B_PARAMS = 4.02e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    on_cpu = jax.default_backend() == "cpu"
    baseline = "numpy copy" if on_cpu else "device copy"
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; params shaped like SmolLM2-135M; baseline: {baseline}")
    results = {}
    for dtype, np_dtype in ((jnp.float32, np.float32), (jnp.bfloat16, ml_dtypes.bfloat16)):
        a = dj.init_params(BENCH_CONFIG, jax.random.key(0), dtype)
        b = dj.init_params(BENCH_CONFIG, jax.random.key(1), dtype)
        model_bytes = sum(x.nbytes for x in jax.tree.leaves(a))
        moved = 3 * model_bytes  # read theta_I, read theta_T, write theta(lam)
        state = {"theta": dj.interpolate(a, b, 0.5), "lam": 0.0}

        def switch():
            state["lam"] = 0.37 if state["lam"] != 0.37 else 0.61
            state["theta"] = dj.interpolate(a, b, state["lam"], out=state["theta"])
            return state["theta"]

        t_interp = min(call_times(switch, args.repeats))
        bw_interp = moved / t_interp
        copied = moved // 2 // 4 * 4  # a copy reads and writes: 2x
        if on_cpu:
            src = np.ones(copied // np.dtype(np_dtype).itemsize, np_dtype)
            dst = np.empty_like(src)
            t_copy = min(call_times(lambda: np.copyto(dst, src), args.repeats))
        else:
            t_copy = min(copy_times(copied, args.repeats))
        bw_copy = 2 * copied / t_copy
        results[np.dtype(np_dtype).name] = (bw_interp, bw_copy)
        print(f"{np.dtype(np_dtype).name:>9}: model {model_bytes / 1e6:.0f} MB; interpolate {t_interp * 1e3:.1f} ms "
              f"= {bw_interp / 1e9:.2f} GB/s; {baseline} {bw_copy / 1e9:.2f} GB/s")  # fmt: skip
    bw_bf16 = results["bfloat16"][0]
    print(f"\nprojected lambda switch, Qwen3-4B bf16 ({3 * 2 * QWEN3_4B_PARAMS / 1e9:.1f} GB moved) at "
          f"{bw_bf16 / 1e9:.2f} GB/s: {3 * 2 * QWEN3_4B_PARAMS / bw_bf16:.2f} s")  # fmt: skip
    for name, (bw_interp, bw_copy) in results.items():
        print(f"ratio interpolate / {baseline} bandwidth, {name}: {bw_interp / bw_copy:.2f}")


if __name__ == "__main__":
    main()
