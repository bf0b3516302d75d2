"""Serving a batch at per-prompt lambdas: ``bucketed`` (one generate per distinct lambda on an
interpolated theta) vs ``mixed`` (one batch, per-row mixing of both endpoints' outputs) vs the
whole batch at one lambda (plain ``generate`` on theta_Thinking, lambda 1.0), on the toy pair,
greedy, float32. Also what ``auto`` would pick from the measured cost model, and its predictions.
Wall time includes lambda switches (interpolation); ratios against the single-lambda run, last.

    python scripts/bench_serving.py [--batch 64] [--new-tokens 96] [--router DIR | --lambdas-from FILE] [--repeats 3]

``--router``: a DAMI-Pref router folder (``dami-jax train-router``); the batch is served at the
lambdas it picks for these prompts. ``--lambdas-from``: a JSON list, one lambda per prompt.
Without either, a seeded router-like mix (40% at 0.0, the rest at 0.5, 0.7 or 1.0).
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

import dami_jax as dj
from dami_jax.dami.pref_router import load_pref_router
from dami_jax.dami.serving import CostModel, Workload, choose_strategy
from dami_jax.evals.prompts import prompt_tokens
from dami_jax.evals.router_training import router_features
from dami_jax.evals.timing import call_times
from dami_jax.toy.evaluation import toy_problems
from dami_jax.toy.task import MAX_STEPS


def default_lambdas(batch: int, seed: int) -> list[float]:
    """A router-like mix: 40% Instruct (0.0), the rest thinking-side values."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(batch) < 0.4, 0.0, rng.choice([0.5, 0.7, 1.0], batch)).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--router", help="a DAMI-Pref router folder: serve at the lambdas it picks")
    parser.add_argument("--lambdas-from", help="JSON list, one lambda per prompt (e.g. a router's output)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    pair = dj.load_toy_pair(dtype=np.float32)
    tokenizer = pair.tokenizers["thinking"]
    problems = toy_problems(-(-args.batch // MAX_STEPS), seed=args.seed)
    picked = np.random.default_rng(args.seed).permutation(len(problems))[: args.batch]  # levels mixed
    prompts = [prompt_tokens(tokenizer, problems[i], "toy") for i in picked]
    if args.router:
        router = load_pref_router(args.router, fingerprint=pair.fingerprints()["instruct"])
        chosen = [problems[i] for i in picked]
        features = router_features(pair, chosen, router.info.prompt["style"], router.info.spec, args.router, router.info.fingerprint)
        lambdas = router.lambdas(features).tolist()
    elif args.lambdas_from:
        with open(args.lambdas_from) as f:
            lambdas = [float(x) for x in json.load(f)]
        if len(lambdas) != len(prompts):
            parser.error(f"--lambdas-from: {len(lambdas)} lambdas for a batch of {len(prompts)}")
    else:
        lambdas = default_lambdas(len(prompts), args.seed)
    n = args.new_tokens
    values, counts = np.unique(np.asarray(lambdas, np.float32), return_counts=True)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; toy pair, float32, greedy, batch {len(prompts)}, "
          f"up to {n} new tokens; lambdas " + ", ".join(f"{v:g} x{c}" for v, c in zip(values, counts)))  # fmt: skip

    cost_model = CostModel.measure(pair)
    work = Workload.of(lambdas, n)
    predicted = cost_model.predict(work)
    choice = choose_strategy(work, cost_model)
    print(f"cost model: {cost_model}\npredicted (every group for all steps): bucketed "
          f"{predicted['bucketed']:.3f} s, mixed {predicted['mixed']:.3f} s -> auto picks {choice}\n")  # fmt: skip

    runs = {
        "single lambda 1.0": lambda: dj.generate(pair.thinking, pair.cfg, prompts, max_new_tokens=n),
        "bucketed": lambda: dj.serve(pair, prompts, lambdas, strategy="bucketed", max_new_tokens=n),
        "mixed": lambda: dj.serve(pair, prompts, lambdas, strategy="mixed", max_new_tokens=n),
    }
    results = {}
    for name, run in runs.items():
        seconds = min(call_times(run, args.repeats))  # after one warm-up (compile) call
        tokens = int(np.asarray(run().lengths).sum())
        results[name] = (seconds, tokens)
        print(f"{name:>17}: {seconds:7.3f} s  {tokens:6d} tokens  {tokens / seconds:9.1f} tok/s")
    print()
    base_s, base_tokens = results["single lambda 1.0"]
    for name in ("bucketed", "mixed"):
        seconds, tokens = results[name]
        speed = (tokens / seconds) / (base_tokens / base_s)
        print(f"ratio {name} / single lambda: wall {seconds / base_s:.2f}x, tok/s {speed:.2f}x")


if __name__ == "__main__":
    main()
