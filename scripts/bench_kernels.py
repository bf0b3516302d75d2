"""Decode attention at Llama-3.1-8B's attention shapes (32 query / 8 KV heads, head_dim 128), random
data: dense attention (XLA; on GPU also the Pallas flash-decoding kernel and cuDNN through
``jax.nn.dot_product_attention``) against TailorKV's quantized-layer attention (the XLA reference,
Pallas, Triton) and the whole per-layer decode steps of the caches (``attend`` on a one-layer
dense, quantized or sparse cache: append, channel scoring, top-k, gathers, attention), each as a
ratio to dense XLA attention measured in the same run. Then dense decode attention over a
per-slot cache of ``--capacity`` slots (32768) whose rows hold ``--live`` live tokens (1024),
against the same cache full: XLA over the whole cache masked, XLA over a static window (the
power-of-two bucket of the longest live row), and on GPU the Pallas and Triton kernels with
per-row lengths and cuDNN with ``key_value_seq_lengths``. Ends with the projected per-token
decode time of Llama-3.1-8B with the preset.

    python scripts/bench_kernels.py [--contexts 8192 32768 131072] [--batch 1 8] [--repeats 20]
        [--dtype bfloat16] [--preset TailorKV-1] [--capacity 32768] [--live 1024]

Defaults follow the backend: on GPU the sizes above in bfloat16; on CPU 2048 and 8192 tokens,
batch 1, float32, and only the XLA paths are timed (the Pallas and Triton kernels run there in
interpreters, whose speed means nothing). A time is the median of ``--repeats`` calls after
warm-up, each waited for; the calls rotate over several random input sets (at least 256 MB
together, at most 8 sets), so that repeats do not run from a cache that a real decode step,
with 31 other layers and the weights passing through it, would have flushed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import importlib.util
import itertools
import math
import statistics
import sys
from typing import Callable

import jax
import jax.numpy as jnp
from tqdm import tqdm

from dami_jax.decoding.cache import DenseCacheConfig, DenseKVCache
from dami_jax.evals.timing import call_times, copy_times
from dami_jax.models.attention import attention
from dami_jax.models.config import ModelConfig
from dami_jax.models.params import param_shapes
from dami_jax.tailorkv.cache import PRESETS, TailorKVConfig
from dami_jax.tailorkv.quant import quantize_keys, quantize_values
from dami_jax.tailorkv.quant_attention import quantized_attention
from dami_kernels import decode_attention as pallas_dense
from dami_kernels import quant_attention as pallas_quant
from dami_kernels.blocks import next_power_of_2

LLAMA_3_1_8B = ModelConfig(architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                           num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                           max_position_embeddings=131072)  # fmt: skip
DEFAULTS = {  # backend -> (contexts, batch sizes, dtype)
    "gpu": ([8192, 32768, 131072], [1, 8], "bfloat16"),
    "cpu": ([2048, 8192], [1], "float32"),
}
GOAL_CONTEXT = 32768  # the goals are stated at 32k
CAPACITY, LIVE = 32768, 1024  # the per-slot cache's slots, and the live tokens of each row
ROTATE_BYTES, MAX_SETS = 256 * 2**20, 8
GENERATED = 16  # slots for generated tokens in the step caches
COPY_BYTES = {"gpu": 2 * 2**30, "cpu": 256 * 2**20}  # the bandwidth probe: well past the L2 / LLC


@dataclasses.dataclass(frozen=True)
class Shape:
    context: int
    batch: int
    dtype: str


@dataclasses.dataclass(frozen=True)
class Row:
    """One timed path: ``fn(*inputs)`` over one family's input sets. A stateful fn returns
    (out, new first input), and that first input (a cache) is donated and replaced."""

    name: str
    fn: Callable
    stateful: bool = False
    kernel: str | None = None  # re-point the sets' TailorKV caches (built with "xla") at this kernel first
    ours: bool = True  # False for a third-party baseline, whose failure means "unavailable"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, not the whole usage."""
        print(f"bench_kernels.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def _normal(key: jax.Array, shape: tuple[int, ...], dtype: str) -> jax.Array:
    return jax.random.normal(key, shape).astype(dtype)


def dense_inputs(key: jax.Array, shape: Shape, kv_heads_last: bool = False) -> tuple:
    """q [B, 1, Hq, hd]; k, v [B, Hkv, S, hd] (or [B, S, Hkv, hd], cuDNN's layout); mask [B, 1, S]."""
    cfg, b, s = LLAMA_3_1_8B, shape.batch, shape.context
    kq, kk, kv = jax.random.split(key, 3)
    kv_shape = (b, s, cfg.num_kv_heads, cfg.head_dim) if kv_heads_last else (b, cfg.num_kv_heads, s, cfg.head_dim)
    q = _normal(kq, (b, 1, cfg.num_heads, cfg.head_dim), shape.dtype)
    k, v = _normal(kk, kv_shape, shape.dtype), _normal(kv, kv_shape, shape.dtype)
    return (q, k, v) if kv_heads_last else (q, k, v, jnp.ones((b, 1, s), bool))


def quantized_inputs(key: jax.Array, shape: Shape, preset: TailorKVConfig) -> tuple:
    """The quantized layer's attention arguments: every token in the store, the last R + 1 served
    (and so masked in the store) from the full-precision ring, as in the cache."""
    q, k, v, _ = dense_inputs(key, shape)
    ring = preset.residual + 1
    quantize = dict(bits=preset.bits, group=preset.group, scale_dtype=jnp.dtype(preset.scale_dtype))
    mask_quant = jnp.broadcast_to(jnp.arange(shape.context) < shape.context - ring, (shape.batch, 1, shape.context))
    return (q, quantize_keys(k, **quantize), quantize_values(v, **quantize), k[:, :, -ring:], v[:, :, -ring:],
            mask_quant, jnp.ones((shape.batch, 1, ring), bool))  # fmt: skip


def step_inputs(key: jax.Array, shape: Shape, config) -> tuple:
    """(cache, q, k, v): a one-layer cache made by ``config`` from a random prefill of
    ``shape.context`` tokens, and one new token's q [B, 1, Hq, hd], k, v [B, 1, Hkv, hd]."""
    cfg, b = dataclasses.replace(LLAMA_3_1_8B, num_layers=1), shape.batch
    kk, kv, kq, kn, kw = jax.random.split(key, 5)
    kv_shape = (b, cfg.num_kv_heads, shape.context + GENERATED, cfg.head_dim)
    dense = DenseKVCache(k=(_normal(kk, kv_shape, shape.dtype),), v=(_normal(kv, kv_shape, shape.dtype),),
                         length=jnp.asarray(shape.context, jnp.int32), start=jnp.zeros((b,), jnp.int32))  # fmt: skip
    new = (b, 1, cfg.num_kv_heads, cfg.head_dim)
    return (config.after_prefill(cfg, dense, shape.context), _normal(kq, (b, 1, cfg.num_heads, cfg.head_dim), shape.dtype),
            _normal(kn, new, shape.dtype), _normal(kw, new, shape.dtype))  # fmt: skip


def cache_inputs(key: jax.Array, shape: Shape, kv_heads_last: bool = False) -> tuple:
    """A per-slot cache of ``shape.context`` slots: q, k, v as :func:`dense_inputs`; lengths int32
    [B], every row full (the live rows' lengths replace them)."""
    q, k, v, *_ = dense_inputs(key, shape, kv_heads_last)
    return q, k, v, jnp.full((shape.batch,), shape.context, jnp.int32)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array) -> jax.Array:
    """XLA: ``attention`` over every slot of k, v [B, Hkv, S, hd], mask = slot < lengths[b]."""
    return attention(q, k, v, (jnp.arange(k.shape[2])[None, :] < lengths[:, None])[:, None])


def live_rows(live: int, backend: str) -> list[tuple[Row, bool]]:
    """(path fn(q, k, v, lengths), whether it reads K/V as [B, S, Hkv, hd]) for rows of ``live``
    live tokens; the kernels on GPU only."""
    width = next_power_of_2(live)
    window = lambda q, k, v, lengths: masked_attention(q, k[:, :, :width], v[:, :, :width], lengths)  # noqa: E731
    rows = [(Row("XLA, whole cache masked", jax.jit(masked_attention)), False),
            (Row("XLA, window of the longest row's bucket", jax.jit(window)), False)]  # fmt: skip
    if backend == "gpu":
        rows.append((Row("Pallas, per-row lengths", jax.jit(pallas_dense.decode_attention)), False))
        if importlib.util.find_spec("jax_triton") is not None:
            triton = importlib.import_module("dami_kernels.triton_attention")
            rows.append((Row("Triton, per-row lengths", jax.jit(triton.decode_attention)), False))
        cudnn = lambda q, k, v, lengths: jax.nn.dot_product_attention(  # noqa: E731
            q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
        rows.append((Row("cuDNN, key_value_seq_lengths", jax.jit(cudnn), ours=False), True))
    return rows


def run_live(capacity: int, live: int, batch: int, dtype: str, backend: str, repeats: int,
             failed: list[str]) -> None:  # fmt: skip
    """Print each path's median ms with every row at ``live`` tokens and at ``capacity`` (full)."""
    layouts, base = {}, None  # kv_heads_last -> input sets; XLA over the whole cache, rows live
    for (row, kv_heads_last), (full, _) in zip(live_rows(live, backend), live_rows(capacity, backend)):
        if kv_heads_last not in layouts:
            make = functools.partial(cache_inputs, shape=Shape(capacity, batch, dtype), kv_heads_last=kv_heads_last)
            layouts[kv_heads_last] = input_sets(jax.jit(make))
        times = []
        for path, n in ((row, live), (full, capacity)):
            sets = [(*inputs[:3], jnp.full((batch,), n, jnp.int32)) for inputs in layouts[kv_heads_last]]
            try:
                times.append(median_ms(path, sets, repeats))
            except Exception as e:  # noqa: BLE001  one path failing here must not hide the others
                first = (str(e).strip().splitlines() or [""])[0][:160]
                times.append(f"{'FAILED' if row.ours else 'unavailable'}: {type(e).__name__}: {first}")
                if row.ours:
                    failed.append(f"{row.name} ({capacity} slots, {n} live, batch {batch})")
        base = times[0] if base is None else base
        if all(isinstance(t, float) for t in (*times, base)):
            ratios = f"{times[0] / times[1]:10.3f} {times[0] / base:12.3f}"
            print(f"{batch:5d}  {row.name:<42}{times[0]:12.3f} {times[1]:12.3f} {ratios}")
        else:
            print(f"{batch:5d}  {row.name:<42}  {'; '.join(map(str, times))}")


def input_sets(make: Callable[[jax.Array], tuple]) -> list[tuple]:
    """Random input sets from ``make(key)``: as many as make up ROTATE_BYTES (1 to MAX_SETS)."""
    first = jax.block_until_ready(make(jax.random.key(0)))
    size = sum(x.nbytes for x in jax.tree.leaves(first))
    count = min(MAX_SETS, max(1, -(-ROTATE_BYTES // size)))
    return [first] + [make(jax.random.key(i)) for i in range(1, count)]


def median_ms(row: Row, sets: list[tuple], repeats: int) -> float:
    """Median milliseconds of ``row.fn`` called on the sets in turn (warm-up: one call per set)."""
    turn = itertools.count()

    def call():
        i = next(turn) % len(sets)
        out = row.fn(*sets[i])
        if row.stateful:
            out, state = out
            sets[i] = (state, *sets[i][1:])
        return out

    return statistics.median(call_times(call, repeats, warmup=len(sets))) * 1e3


# A cache's layer-0 decode step, the cache donated (each step updates it in place).
layer_step = jax.jit(lambda cache, q, k, v: cache.attend(0, q, k, v), donate_argnums=0)


def families(shape: Shape, preset: TailorKVConfig, backend: str) -> list[tuple[Callable, list[Row]]]:
    """(make(key) -> one input set, the rows timed on those inputs) for one shape; the compiled
    kernels on GPU only."""
    on_gpu, triton = backend == "gpu", None
    if on_gpu and importlib.util.find_spec("jax_triton") is not None:
        triton = importlib.import_module("dami_kernels.triton_attention")
    dense = [Row("dense attention, XLA", jax.jit(attention))]
    quantized = [Row("quantized attention, XLA reference", jax.jit(quantized_attention))]
    quantized_kernels, sparse_kernels = ["xla"], ["xla"]
    if on_gpu:
        dense.append(Row("dense attention, Pallas flash-decoding", jax.jit(pallas_dense.decode_attention)))
        quantized.append(Row("quantized attention, Pallas", jax.jit(pallas_quant.quantized_attention)))
        quantized_kernels.append("pallas")
        sparse_kernels.append("pallas")  # kernel="triton" runs the sparse layers through Pallas too
    if triton is not None:
        quantized.append(Row("quantized attention, Triton", jax.jit(triton.quantized_attention)))
        quantized_kernels.append("triton")
    tailorkv = dataclasses.replace(preset, kernel="xla")
    out = [
        (functools.partial(dense_inputs, shape=shape), dense),
        (functools.partial(quantized_inputs, shape=shape, preset=preset), quantized),
        (functools.partial(step_inputs, shape=shape, config=DenseCacheConfig()),
         [Row("dense layer step, XLA", layer_step, stateful=True)]),
        (functools.partial(step_inputs, shape=shape, config=dataclasses.replace(tailorkv, quantized_layers=(0,))),
         [Row(f"quantized layer step, {k}", layer_step, stateful=True, kernel=k) for k in quantized_kernels]),
        (functools.partial(step_inputs, shape=shape, config=dataclasses.replace(tailorkv, quantized_layers=())),
         [Row(f"sparse layer step, {k}", layer_step, stateful=True, kernel=k) for k in sparse_kernels]),
    ]  # fmt: skip
    if on_gpu:
        cudnn = functools.partial(jax.nn.dot_product_attention, implementation="cudnn")
        out.insert(1, (functools.partial(dense_inputs, shape=shape, kv_heads_last=True),
                       [Row("dense attention, cuDNN", jax.jit(cudnn), ours=False)]))  # fmt: skip
    return out


def weight_bytes(cfg: ModelConfig, itemsize: int) -> int:
    """Bytes of weights one decode step reads: every matrix once, of the embedding table one row."""
    shapes = jax.tree.leaves(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    return (sum(math.prod(s) for s in shapes) - (cfg.vocab_size - 1) * cfg.hidden_size) * itemsize


def parse_args(backend: str) -> argparse.Namespace:
    contexts, batches, dtype = DEFAULTS["gpu" if backend == "gpu" else "cpu"]
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=contexts, help=f"prompt tokens (default {contexts})")
    parser.add_argument("--batch", type=int, nargs="+", default=batches, help=f"batch sizes (default {batches})")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per path (default 20)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=dtype, help=f"K/V and query dtype (default {dtype})")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="TailorKV-1", help="TailorKV preset (default TailorKV-1)")
    parser.add_argument("--capacity", type=int, default=CAPACITY, help=f"per-slot cache slots (default {CAPACITY})")
    parser.add_argument("--live", type=int, default=LIVE, help=f"live tokens per row of that cache (default {LIVE})")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    least = 2 * preset.residual
    if any(c < least or c % preset.group for c in args.contexts):
        parser.error(f"--contexts {args.contexts}: each must be a multiple of {preset.group} and >= {least}")
    if min(args.batch) < 1 or args.repeats < 1:
        parser.error(f"--batch {args.batch} and --repeats {args.repeats} must be >= 1")
    if not 1 <= args.live <= args.capacity:
        parser.error(f"--live {args.live} must be in [1, --capacity {args.capacity}]")
    return args


def run_shape(shape: Shape, preset: TailorKVConfig, backend: str, repeats: int, bar: tqdm,
              failed: list[str]) -> dict[str, float | str]:  # fmt: skip
    """Each row's median ms, or why it has none (our own paths' failures also go to ``failed``);
    the table's lines printed as they come."""
    out: dict[str, float | str] = {}
    for make, rows in families(shape, preset, backend):
        sets = input_sets(jax.jit(make))
        for row in rows:
            if row.kernel is not None:  # the same caches, read by each kernel
                sets = [(cache.replace(kernel=row.kernel), *rest) for cache, *rest in sets]
            try:
                out[row.name] = median_ms(row, sets, repeats)
            except Exception as e:  # noqa: BLE001  one path failing on this machine must not hide the others
                first = (str(e).strip().splitlines() or [""])[0][:160]
                out[row.name] = f"{'FAILED' if row.ours else 'unavailable'}: {type(e).__name__}: {first}"
                if row.ours:
                    failed.append(f"{row.name} ({shape.context} tokens, batch {shape.batch})")
            value, base = out[row.name], out["dense attention, XLA"]
            shown = f"  {value}" if isinstance(value, str) else f"{value:10.3f}"
            if isinstance(value, float) and isinstance(base, float):
                shown += f" {value / base:11.2f}"
            bar.write(f"{shape.context:8d} {shape.batch:5d}  {row.name:<40}{shown}")
            bar.update()
        del sets
    return out


def report_goals(results: dict, contexts: list[int], batches: list[int], auto: str) -> None:
    if GOAL_CONTEXT not in contexts:
        print(f"goals (stated at {GOAL_CONTEXT} tokens): not measured in this run")
        return
    for batch in batches:
        row = results[(GOAL_CONTEXT, batch)]
        base, quant, sparse = row["dense attention, XLA"], row.get("quantized attention, Pallas"), row[f"sparse layer step, {auto}"]
        if isinstance(quant, float):
            speedup = base / quant
            print(f"goal, {GOAL_CONTEXT} tokens, batch {batch}: Pallas quantized attention {speedup:.2f}x faster than "
                  f"dense XLA (goal >= 3x: {'met' if speedup >= 3 else 'missed'})")  # fmt: skip
        if isinstance(sparse, float):
            ratio = sparse / base
            print(f"goal, {GOAL_CONTEXT} tokens, batch {batch}: sparse layer step ({auto}) {ratio:.2f}x dense XLA "
                  f"attention's time (goal <= 0.25x: {'met' if ratio <= 0.25 else 'missed'})")  # fmt: skip


def report_projection(results: dict, context: int, batches: list[int], preset_name: str, auto: str, dtype: str,
                      bandwidth: float) -> None:  # fmt: skip
    """Per decode step = quantized layers x their step + sparse layers x theirs + weights / bandwidth."""
    cfg, preset = LLAMA_3_1_8B, PRESETS[preset_name]
    weights = weight_bytes(cfg, jnp.dtype(dtype).itemsize)
    weights_ms = weights / bandwidth * 1e3
    n_quant = len(preset.quantized_layers)
    n_sparse = cfg.num_layers - n_quant
    print(f"\nprojected Llama-3.1-8B decode step at {context} tokens (one new token per row; weights in {dtype}, "
          f"{weights / 1e9:.2f} GB read once per step at the copy bandwidth; norms, RoPE, sampling and launch gaps left "
          f"out, so the non-attention part is a lower bound):")  # fmt: skip
    for batch in batches:
        row = results[(context, batch)]
        quant, sparse, dense = row[f"quantized layer step, {auto}"], row[f"sparse layer step, {auto}"], row["dense layer step, XLA"]
        weights_term = f"{weights / 1e9:.3f} GB / {bandwidth / 1e9:.1f} GB/s"
        if isinstance(quant, float) and isinstance(sparse, float):
            total = n_quant * quant + n_sparse * sparse + weights_ms
            print(f"  batch {batch}, {preset_name} ({auto}): {n_quant} x quantized step + {n_sparse} x sparse step + "
                  f"weights / bandwidth = {n_quant} x {quant:.3f} + {n_sparse} x {sparse:.3f} + {weights_term} = "
                  f"{total:.1f} ms (goal <= 40 ms on an H100; the paper: 56 ms on an A100 with its CUDA kernels)")  # fmt: skip
        if isinstance(dense, float):
            total = cfg.num_layers * dense + weights_ms
            print(f"  batch {batch}, dense cache: {cfg.num_layers} x dense step + weights / bandwidth = "
                  f"{cfg.num_layers} x {dense:.3f} + {weights_term} = {total:.1f} ms")  # fmt: skip


def main() -> None:
    backend = jax.default_backend()
    args = parse_args(backend)
    preset = PRESETS[args.preset]
    auto = preset.kernel_for(LLAMA_3_1_8B, backend)  # what kernel="auto" picks here
    print(f"Llama-3.1-8B attention (32 query / 8 KV heads, head_dim 128), {args.dtype}, random data; "
          f"jax {jax.__version__} on {backend} ({jax.devices()[0].device_kind})")  # fmt: skip
    print(f"{args.preset}: {preset.bits}-bit store + ring of R + 1 = {preset.residual + 1} exact tokens; sparse layers: "
          f"budget {preset.budget} = {preset.sink} + {preset.recent} + top-{preset.top_k}, {preset.num_channels} channels, "
          f"prompt K/V in host memory; each path jitted and timed as one call: median of {args.repeats} calls after "
          f"warm-up, inputs rotating over >= {ROTATE_BYTES // 2**20} MB; kernel='auto' picks {auto!r} here")  # fmt: skip
    if backend != "gpu":
        print(f"{backend}: only the XLA paths are timed; the Pallas and Triton kernels run here in interpreters, whose "
              "speed means nothing")  # fmt: skip
    elif importlib.util.find_spec("jax_triton") is None:
        print("Triton: not timed (jax-triton is not installed: the gpu extra)")
    copied = COPY_BYTES["gpu" if backend == "gpu" else "cpu"]
    bandwidth = 2 * copied / statistics.median(copy_times(copied, args.repeats))
    print(f"device copy bandwidth: {bandwidth / 1e9:.1f} GB/s (a float32 buffer negated in place; bytes read + written)\n")
    print(f"{'context':>8} {'batch':>5}  {'path':<40}{'ms':>10} {'x dense XLA':>11}")
    shapes = [Shape(c, b, args.dtype) for c in args.contexts for b in args.batch]
    rows_per_shape = sum(len(rows) for _, rows in families(shapes[0], preset, backend))
    results, failed = {}, []
    with tqdm(total=len(shapes) * rows_per_shape, desc="paths", unit="path", disable=None) as bar:
        for shape in shapes:
            results[(shape.context, shape.batch)] = run_shape(shape, preset, backend, args.repeats, bar, failed)
    print(f"\ndense decode attention over a per-slot cache of {args.capacity} slots, every row live up to "
          f"{args.live} tokens (XLA's window: {next_power_of_2(args.live)} slots) against every row full; "
          f"median ms of {args.repeats} calls after warm-up")  # fmt: skip
    print(f"{'batch':>5}  {'path':<42}{f'live {args.live}':>12} {f'live {args.capacity}':>12} {'live/full':>10} "
          f"{'x XLA masked':>12}")  # fmt: skip
    for batch in args.batch:
        run_live(args.capacity, args.live, batch, args.dtype, backend, args.repeats, failed)
    print()
    report_goals(results, args.contexts, args.batch, auto)
    report_projection(results, max(args.contexts), args.batch, args.preset, auto, args.dtype, bandwidth)
    if failed:
        print(f"\nfailed: {'; '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
