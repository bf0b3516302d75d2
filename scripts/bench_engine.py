"""Continuous batching (the engine) against static batches of the same size: useful tokens/s
(tokens that end up in a result), slot occupancy, prefill vs decode time and compilations, float32,
greedy, measured in one run. Every workload runs once to compile, then once timed, for both sides.

    python scripts/bench_engine.py [--router DIR] [--slots 8] [--toy-requests 160] [--smollm2-requests 96]
                                   [--workloads toy smollm2 live]

1. The toy pair on a route-eval mix: ``--toy-requests`` held-out problems of the easy-heavy mix at
   the lambdas a router picks for them, up to ``--toy-new-tokens``: DAMI-Pref with ``--router``
   (a ``dami-jax train-router`` folder), else DAMI-Conf (zero-shot: Instruct drafts, both models
   score). Static: batches of ``--slots`` prompts in arrival order through ``serve_static``
   (the path before the engine: auto picks bucketed or mixed per batch).
2. The engine's own choices on that mix: decode steps per host round trip, admission order and
   the theta cache, each against the defaults; and what one plain and one mixed decode step, one
   prefill piece and one interpolation cost.
3. SmolLM2-135M-Instruct (one model, lambda 0) on ``--smollm2-requests`` chat prompts whose token
   budgets are heavy-tailed (lognormal, clipped to [8, 512]); no stop ids, so every request uses
   its whole budget. Static: ``dj.generate`` batches of ``--slots`` in arrival order, each until
   its largest budget.
4. Cost follows live work, SmolLM2-135M: one stream (a ~100-token prompt, ``--live-tokens`` new
   tokens) on an engine of ``--slots`` slots at ``max_len`` 8192 and 512 against ``dj.generate``
   at batch 1 on the same prompt; one decode step of a lone row in a rows bucket of 1 against one
   of all slots; decode steps at live lengths of 100 to 7000 tokens, rows read live
   (``RowLayout``'s default) against rows read whole (the engine before, ``window`` = capacity);
   and warm-up: the compilations and seconds of ``Engine.warmup``.
5. ``steps`` (not run by default; the GPU check's, with ``--dtype bfloat16``): decode step times at
   ``max_len`` 8192 and 32768 (SmolLM2's shapes, its context stretched), every slot busy with rows
   1024 tokens long or nearly full: slot 0 alone, slot 0 in a call of all slots whose others are
   idle (a free slot below a busy one), and all slots, per decode attention (XLA, and on
   a GPU the Pallas kernel), and with ``--step-caches dense tailorkv-1`` on TailorKV slots too.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import dami_jax as dj
from dami_jax.dami.conf_router import ConfMap, draft_signals
from dami_jax.dami.pair import ModelPair
from dami_jax.dami.pref_router import load_pref_router
from dami_jax.dami.serving import serve_static
from dami_jax.engine.cache import RowLayout
from dami_jax.engine.engine import Engine, EngineStats
from dami_jax.engine.requests import Request
from dami_jax.engine.scheduler import DecodePlan, PackPlan, Plan, Running
from dami_jax.evals.calibration import quantized_layers_or_profile
from dami_jax.evals.prompts import prompt_tokens
from dami_jax.evals.router_data import mix_problems
from dami_jax.evals.router_training import router_features
from dami_jax.evals.sweep import DEFAULT_LAMBDAS
from dami_jax.models.pinned import smollm2_checkpoint
from dami_jax.models.tokenizer import chat_tokens, load_tokenizer
from dami_jax.tailorkv.cache import PRESETS
from dami_jax.toy.evaluation import toy_problems

CACHE_PRESETS = {"tailorkv-1": "TailorKV-1", "tailorkv-2": "TailorKV-2"}  # --step-caches -> dami_jax.tailorkv.cache.PRESETS
STEP_NEW_TOKENS = 256  # the steps workload's TailorKV engines admit answers this long



class Compiles:
    """Counts XLA compilations (jax's backend-compile events) while it is open."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._heard)

    def _heard(self, event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


COMPILES = Compiles()


def timed(run: Callable[[], object]) -> tuple[object, float, int, int]:
    """(result, seconds, compiles) of a timed call after a compiling one; and the warm-up's compiles."""
    before = COMPILES.count
    jax.block_until_ready(run())
    warm = COMPILES.count - before
    before, started = COMPILES.count, time.perf_counter()
    out = jax.block_until_ready(run())
    return out, time.perf_counter() - started, COMPILES.count - before, warm


def run_engine(pair: ModelPair, requests: Sequence[dict], slots: int, max_len: int, **options) -> tuple[list, EngineStats]:
    engine = Engine(pair, slots=slots, max_len=max_len, **options)
    for r in requests:
        engine.submit(r["prompt"], lam=r["lam"], max_new_tokens=r["max_new"], stop_tokens=r.get("stop"))
    return engine.run(), engine.stats


def static_batches(requests: Sequence[dict], slots: int, serve_batch: Callable[[list[dict]], list[list[int]]]) -> list[list[int]]:
    """Each batch of ``slots`` requests in arrival order, served until its longest row is done."""
    rows = []
    for lo in range(0, len(requests), slots):
        rows += serve_batch(list(requests[lo : lo + slots]))
    return rows


def report(name: str, requests: Sequence[dict], slots: int, max_len: int, serve_batch, pair: ModelPair, static_steps,
           **options) -> None:  # fmt: skip
    """Time the engine (with ``options``) against static batches on ``requests``; print one comparison."""
    static_rows, static_s, static_compiles, static_warm = timed(lambda: static_batches(requests, slots, serve_batch))
    (results, stats), engine_s, engine_compiles, engine_warm = timed(lambda: run_engine(pair, requests, slots, max_len, **options))
    _, profiled = run_engine(pair, requests, slots, max_len, profile=True, **options)  # waits after each call: the time split
    engine_rows = [r.tokens for r in results]
    useful = sum(len(t) for t in engine_rows)
    static_useful = sum(len(t) for t in static_rows)
    same = sum(a == b for a, b in zip(engine_rows, static_rows))
    static_slot_steps = static_steps(requests, static_rows, slots)
    print(f"\n{name}: {len(requests)} requests, {slots} slots; engine options {options or 'the defaults'}")
    print(f"  static : {static_s:7.2f} s  {static_useful:6d} useful tokens  {static_useful / static_s:8.1f} tok/s  "
          f"occupancy {static_useful / static_slot_steps:.2f}  compiles {static_warm} warm-up, {static_compiles} timed")  # fmt: skip
    print(f"  engine : {engine_s:7.2f} s  {useful:6d} useful tokens  {useful / engine_s:8.1f} tok/s  "
          f"occupancy {stats.occupancy:.2f}  compiles {engine_warm} warm-up, {engine_compiles} timed")  # fmt: skip
    print(f"  engine calls: {stats.prefill_pieces} prefill pieces ({stats.prefill_tokens} tokens), {stats.decode_calls} decode "
          f"calls ({stats.decode_steps} steps, {stats.mixed_steps} mixed), {stats.interpolations} interpolations")  # fmt: skip
    total = profiled.prefill_s + profiled.decode_s
    print(f"  engine time, a pass that waits after every call: prefill {profiled.prefill_s:.2f} s "
          f"({profiled.prefill_s / total:.0%}), decode {profiled.decode_s:.2f} s ({profiled.decode_s / total:.0%})")  # fmt: skip
    print(f"  identical results: {same} of {len(requests)}")
    print(f"  ratio engine / static, useful tok/s: {(useful / engine_s) / (static_useful / static_s):.2f}x")


# --------------------------------------------------------------------------- workloads


def toy_workload(pair: ModelPair, count: int, new_tokens: int, seed: int, router: str | None) -> list[dict]:
    """The easy-heavy mix at a router's lambdas, shuffled into an arrival order."""
    tokenizer = pair.tokenizers["thinking"]
    problems = mix_problems(toy_problems(-(-count // 2), seed=seed), "easy-heavy", count)
    prompts = [prompt_tokens(tokenizer, p, "toy") for p in problems]
    if router:
        pref = load_pref_router(router, fingerprint=pair.fingerprints()["instruct"])
        features = router_features(pair, problems, pref.info.prompt["style"], pref.info.spec, router, pref.info.fingerprint)
        lambdas = pref.lambdas(features)
    else:
        signals = draft_signals(pair, prompts, max_draft_tokens=32)
        lambdas, _ = ConfMap().route(signals.confidence, signals.discrepancy, DEFAULT_LAMBDAS)
    order = np.random.default_rng(seed).permutation(len(prompts))
    return [{"prompt": prompts[i], "lam": float(lambdas[i]), "max_new": new_tokens} for i in order]


def toy_static(pair: ModelPair) -> Callable[[list[dict]], list[list[int]]]:
    def serve_batch(batch: list[dict]) -> list[list[int]]:
        out = serve_static(pair, [r["prompt"] for r in batch], [r["lam"] for r in batch], max_new_tokens=batch[0]["max_new"])
        return out.token_lists()

    return serve_batch


def longest_row_steps(requests: Sequence[dict], rows: Sequence[list[int]], slots: int) -> int:
    """Slot-steps of static batches: every row of a batch runs as long as its longest row."""
    return sum(max(len(r) for r in rows[lo : lo + slots]) * slots for lo in range(0, len(rows), slots))


def smollm2_workload(tokenizer, count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    budgets = np.clip(np.round(rng.lognormal(np.log(48), 1.0, count)), 8, 512).astype(int)
    questions = [p.question for p in toy_problems(-(-count // 6), seed=seed)][:count]
    prompts = [chat_tokens(tokenizer, f"Solve step by step: {q}") for q in questions]
    return [{"prompt": p, "lam": 0.0, "max_new": int(b), "stop": []} for p, b in zip(prompts, budgets)]


def smollm2_static(pair: ModelPair) -> Callable[[list[dict]], list[list[int]]]:
    def serve_batch(batch: list[dict]) -> list[list[int]]:
        longest = max(r["max_new"] for r in batch)
        out = dj.generate(pair.instruct, pair.cfg, [r["prompt"] for r in batch], max_new_tokens=longest, stop_tokens=[])
        return [row[: r["max_new"]] for row, r in zip(out.token_lists(), batch)]  # beyond its budget a row is waste

    return serve_batch


def budget_steps(requests: Sequence[dict], rows: Sequence[list[int]], slots: int) -> int:
    """Slot-steps of static batches that run to their largest budget."""
    return sum(max(r["max_new"] for r in requests[lo : lo + slots]) * slots for lo in range(0, len(requests), slots))


# --------------------------------------------------------------------------- the engine's choices


def call_ms(engine: Engine, plan: Plan, repeats: int = 5) -> float:
    """Milliseconds of dispatching ``plan`` on ``engine``'s runtime and waiting for it (the best of
    ``repeats``, after one that compiles)."""
    def call():
        engine.runtime.dispatch(plan)
        return engine.runtime.state

    return 1e3 * min(timed(call)[1] for _ in range(repeats))


def decoding_engine(pair: ModelPair, slots: int, max_len: int, prompt: Sequence[int], busy: int, **options) -> Engine:
    """An engine whose first ``busy`` slots decode ``prompt`` (no stop ids, budgets that last)."""
    engine = Engine(pair, slots=slots, max_len=max_len, **options)
    for _ in range(busy):
        engine.submit(prompt, max_new_tokens=min(max_len - len(prompt), engine.max_new_tokens + 1) - 64, stop_tokens=[])
    while any(r is not None and r.prefilling for r in engine.scheduler.table) or engine.waiting:
        engine.step()
    engine.step()
    return engine


def decode_plan(engine: Engine, rows: int, lam: float | None, busy: int | None = None) -> Plan:
    """One decode step of slots 0..rows-1; with ``busy``, only the first ``busy`` of them are live
    (the rest ride in the call as a free slot below a busy one would)."""
    live = tuple(r is not None and (busy is None or slot < busy) for slot, r in enumerate(engine.scheduler.table))
    return Plan((), (), DecodePlan(rows, 1, lam, (), live))


def step_costs(pair: ModelPair, slots: int, size: int) -> None:
    """Milliseconds of one plain decode step of every slot, one mixed step, one 64-token packed
    prefill and one interpolation at this model's shapes."""
    prompt = list(range(1, 40))
    engine = decoding_engine(pair, slots, size, prompt, slots)
    request = Request(-1, tuple(range(1, 65)), 0.0, 8, dj.GREEDY, np.zeros(2, np.uint32), (), 0.0)
    costs = {
        "plain step": call_ms(engine, decode_plan(engine, slots, 0.0)),
        "mixed step": call_ms(engine, decode_plan(engine, slots, None)),
        "prefill 64": call_ms(engine, Plan((PackPlan(0.0, 64, ((Running(request, 0), 64),)),), (), None)),
    }
    theta = [dj.interpolate(pair.instruct, pair.thinking, 0.5)]

    def interpolation():
        theta[0] = dj.interpolate(pair.instruct, pair.thinking, 0.3, out=theta[0])
        return theta[0]

    costs["interpolation"] = 1e3 * min(timed(interpolation)[1] for _ in range(3))
    print("  " + ", ".join(f"{k} {v:.2f} ms" for k, v in costs.items())
          + f"; mixed / plain step {costs['mixed step'] / costs['plain step']:.2f}x")  # fmt: skip


def engine_choices(pair: ModelPair, requests: Sequence[dict], slots: int, max_len: int) -> None:
    variants = {
        "defaults (steps_per_call=4, fifo, theta_cache=2)": {},
        "steps_per_call=1": dict(steps_per_call=1),
        "steps_per_call=2": dict(steps_per_call=2),
        "steps_per_call=8": dict(steps_per_call=8),
        "admission=group": dict(admission="group"),
        "admission=lambda": dict(admission="lambda"),
        "admission=lambda, theta_cache=1": dict(admission="lambda", theta_cache=1),
        "theta_cache=0": dict(theta_cache=0),
        "theta_cache=11": dict(theta_cache=11),
    }
    base = None
    for name, options in variants.items():
        (results, stats), seconds, _, _ = timed(lambda: run_engine(pair, requests, slots, max_len, **options))
        speed = sum(len(r.tokens) for r in results) / seconds
        base = base or speed
        print(f"  {name:<50} {speed:8.1f} tok/s  {speed / base:5.2f}x  occupancy {stats.occupancy:.2f}  "
              f"mixed steps {stats.mixed_steps}/{stats.decode_steps}  interpolations {stats.interpolations} "
              f"({stats.interpolation_s:.2f} s)")  # fmt: skip


def toy(args: argparse.Namespace) -> None:
    pair = dj.load_toy_pair(dtype=np.float32)
    requests = toy_workload(pair, args.toy_requests, args.toy_new_tokens, args.seed, args.router)
    values, counts = np.unique([r["lam"] for r in requests], return_counts=True)
    print(f"toy lambdas ({'DAMI-Pref' if args.router else 'DAMI-Conf'}): " + ", ".join(f"{v:g} x{c}" for v, c in zip(values, counts)))
    max_len = max(len(r["prompt"]) for r in requests) + args.toy_new_tokens
    report("toy pair, route-eval mix", requests, args.slots, max_len, toy_static(pair), pair, longest_row_steps, admission="lambda")
    print("\nthe engine's choices on the toy mix (useful tok/s against the defaults; route-eval and dj.serve take admission=lambda):")
    engine_choices(pair, requests, args.slots, max_len)
    print("step costs, toy pair:")
    step_costs(pair, args.slots, max_len)


def smollm2_pair(dtype: str = "float32", context: int | None = None) -> ModelPair:
    """SmolLM2-135M-Instruct as both endpoints (one model, lambda 0); ``context`` overrides its
    max_position_embeddings (8192), for step times past it (RoPE runs on; timing only)."""
    folder = smollm2_checkpoint()
    cfg, params = dj.load_checkpoint(folder, dtype=jnp.dtype(dtype))
    if context is not None:
        cfg = dataclasses.replace(cfg, max_position_embeddings=context)
    tokenizer = load_tokenizer(folder)
    return ModelPair(cfg, params, params, {"instruct": tokenizer, "thinking": tokenizer}, {"instruct": str(folder), "thinking": str(folder)})


def smollm2(args: argparse.Namespace) -> None:
    one_model = smollm2_pair()
    requests = smollm2_workload(one_model.tokenizers["instruct"], args.smollm2_requests, args.seed)
    budgets = np.asarray([r["max_new"] for r in requests])
    print(f"\nSmolLM2 budgets: min {budgets.min()}, median {np.median(budgets):.0f}, mean {budgets.mean():.0f}, max {budgets.max()}")
    max_len = max(len(r["prompt"]) for r in requests) + int(budgets.max())
    report("SmolLM2-135M, heavy-tailed budgets", requests, args.slots, max_len, smollm2_static(one_model), one_model, budget_steps)
    print("step costs, SmolLM2-135M (both endpoints the same weights):")
    step_costs(one_model, args.slots, max_len)


def step_caches(pair: ModelPair, names: Sequence[str]) -> dict[str, dict]:
    """Engine options per ``--step-caches`` name: each decode attention for dense (XLA, and on a
    GPU the Pallas kernel); TailorKV presets on the model's layer split, their device store of
    generated tokens sized for ``STEP_NEW_TOKENS``."""
    options = {}
    for name in names:
        if name == "dense":
            options.update({kernel: dict(kernel=kernel) for kernel in (("xla", "pallas") if jax.default_backend() == "gpu" else ("xla",))})
        else:
            layers = quantized_layers_or_profile(pair.paths["instruct"], pair.cfg.num_layers)
            config = dataclasses.replace(PRESETS[CACHE_PRESETS[name]], quantized_layers=layers)
            options[name] = dict(cache=config, max_new_tokens=STEP_NEW_TOKENS)
    return options


def steps(args: argparse.Namespace) -> None:
    """Decode step times of the engine at large ``max_len`` (8k, 32k: the GPU check's rows)."""
    for max_len in args.step_max_lens:
        pair = smollm2_pair(args.dtype, context=max_len)
        rng = np.random.default_rng(args.seed)
        print(f"\nengine decode step, SmolLM2-135M shapes, {args.dtype}, {args.slots} slots busy, max_len {max_len}: "
              f"ms per step of slot 0 alone (rows bucket 1) / of slot 0 with the other slots idle in the call / of all slots")  # fmt: skip
        for length in (1024, max_len - 2 * STEP_NEW_TOKENS):
            tokens = rng.integers(0, pair.cfg.vocab_size, length).tolist()
            base = None
            for name, options in step_caches(pair, args.step_caches).items():
                engine = decoding_engine(pair, args.slots, max_len, tokens, args.slots, prefill_chunk=2048, **options)
                lone, idle, full = (call_ms(engine, decode_plan(engine, rows, 0.0, busy)) for rows, busy in ((1, None), (args.slots, 1), (args.slots, None)))
                base = base or full
                print(f"  {name:<10} rows at {length:6d} live tokens: {lone:8.2f} / {idle:8.2f} / {full:8.2f} ms "
                      f"({args.slots / full * 1e3:8.1f} tok/s with every slot busy; {full / base:.2f}x the first)")  # fmt: skip
                del engine  # one engine's cache at a time


def one_stream(engine: Engine, prompt: Sequence[int], new: int) -> list:
    engine.submit(prompt, max_new_tokens=new, stop_tokens=[])
    return engine.run()


def lone_step_ms(pair: ModelPair, slots: int, prompt: Sequence[int], layout: RowLayout) -> float:
    """One decode step of a lone row holding ``prompt``, at max_len 8192, rows read as ``layout`` says."""
    engine = decoding_engine(pair, slots, 8192, prompt, 1, layout=layout, theta_cache=0)
    return call_ms(engine, decode_plan(engine, 1, 0.0))


def live(args: argparse.Namespace) -> None:
    pair = smollm2_pair()
    cfg, tokenizer, new = pair.cfg, pair.tokenizers["instruct"], args.live_tokens
    prompt = chat_tokens(tokenizer, "Solve step by step: " + " ".join(p.question for p in toy_problems(2, seed=args.seed)[:3]))
    print(f"\ncost follows live work, SmolLM2-135M: one stream, a {len(prompt)}-token prompt, {new} new tokens, {args.slots} slots")
    _, generate_s, _, _ = timed(lambda: dj.generate(pair.instruct, cfg, [prompt], max_new_tokens=new, stop_tokens=[]).tokens)
    print(f"  dj.generate, batch 1      : {new / generate_s:7.1f} tok/s")
    stream_s = {}
    for max_len in (512, 8192):
        engine = Engine(pair, slots=args.slots, max_len=max_len, theta_cache=0)  # lambda 0: an endpoint, never interpolated
        before = COMPILES.count
        warmup_s = engine.warmup()
        warmup_compiles = COMPILES.count - before
        _, stream_s[max_len], compiles, _ = timed(functools.partial(one_stream, engine, prompt, new))
        print(f"  engine, max_len {max_len:<5}    : {new / stream_s[max_len]:7.1f} tok/s  (warm-up: {warmup_compiles} compilations "
              f"in {warmup_s:.1f} s; {compiles} after it)")  # fmt: skip
    print(f"  one stream at 8192 over dj.generate batch 1: {generate_s / stream_s[8192]:.2f}x; "
          f"time at 8192 over 512: {stream_s[8192] / stream_s[512]:.2f}x")
    del engine  # one engine's cache (3 GB at 8192) at a time
    engine = decoding_engine(pair, args.slots, 8192, prompt, busy=1, theta_cache=0)
    lone, full = call_ms(engine, decode_plan(engine, 1, 0.0)), call_ms(engine, decode_plan(engine, args.slots, 0.0))
    print(f"  a decode step of one busy slot: rows bucket 1 {lone:.1f} ms, all {args.slots} rows {full:.1f} ms ({full / lone:.2f}x)")
    del engine
    print("  one decode step of a lone row at its live length, max_len 8192 (ms): rows read live / read whole (before)")
    rng = np.random.default_rng(args.seed)
    for length in (100, 1000, 4000, 7000):
        tokens = rng.integers(0, cfg.vocab_size, length).tolist()
        ms = [lone_step_ms(pair, args.slots, tokens, layout) for layout in (RowLayout(), RowLayout(window=8192))]
        print(f"    {length:5d} tokens: {ms[0]:7.1f} / {ms[1]:7.1f}  ({ms[1] / ms[0]:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--router", help="a DAMI-Pref router folder: the toy mix at its lambdas (default: DAMI-Conf's)")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--toy-requests", type=int, default=160)
    parser.add_argument("--toy-new-tokens", type=int, default=160)
    parser.add_argument("--smollm2-requests", type=int, default=96)
    parser.add_argument("--live-tokens", type=int, default=128, help="new tokens of part 4's stream")
    parser.add_argument("--step-max-lens", type=int, nargs="+", default=[8192, 32768], help="max_len of the steps workload")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights of the steps workload")
    parser.add_argument("--step-caches", nargs="+", choices=("dense", *CACHE_PRESETS), default=["dense"],
                        help="the steps workload's caches (TailorKV: the model's layer split)")
    parser.add_argument("--workloads", nargs="+", choices=("toy", "smollm2", "live", "steps"), default=["toy", "smollm2", "live"],
                        help="which workloads to run (toy: parts 1-2; smollm2: part 3; live: part 4; steps: step times "
                             "at --step-max-lens, the GPU check's)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, float32, greedy")

    if "toy" in args.workloads:
        toy(args)
    if "smollm2" in args.workloads:
        smollm2(args)
    if "live" in args.workloads:
        live(args)
    if "steps" in args.workloads:
        steps(args)


if __name__ == "__main__":
    main()
