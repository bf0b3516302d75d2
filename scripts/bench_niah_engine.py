"""Needle in a haystack through the engine: the cases ``dami-jax niah`` runs (same lengths, depths,
seeds and answer budget), served concurrently, one needle per slot, on TailorKV slots, against
``dj.generate`` on each case alone with the same cache: needles found, and answers equal case for
case (issue 25). SmolLM2-135M-Instruct in float32, TailorKV on its layer profile.

    python scripts/bench_niah_engine.py [--lengths 4096 8192] [--configs TailorKV-1] [--slots 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import dami_jax as dj
from dami_jax.dami.pair import ModelPair
from dami_jax.engine.engine import Engine
from dami_jax.evals.calibration import quantized_layers_or_profile
from dami_jax.evals.niah.cases import build_niah, case_seed, needle_found
from dami_jax.evals.niah.run import DEPTHS, cache_config
from dami_jax.models.pinned import smollm2_checkpoint
from dami_jax.models.tokenizer import load_tokenizer
from dami_jax.tailorkv.cache import PRESETS

NIAH_NEW_TOKENS = 48  # dami-jax niah's --max-new-tokens default


def answer(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--depths", type=float, nargs="+", default=list(DEPTHS))
    parser.add_argument("--configs", nargs="+", choices=tuple(PRESETS), default=["TailorKV-1"])
    parser.add_argument("--slots", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="dami-jax niah's --seed")
    args = parser.parse_args()
    folder = smollm2_checkpoint()
    cfg, params = dj.load_checkpoint(folder, dtype=np.float32)
    tokenizer = load_tokenizer(folder)
    pair = ModelPair(cfg, params, params, {"instruct": tokenizer, "thinking": tokenizer}, {"instruct": str(folder), "thinking": str(folder)})
    layers = quantized_layers_or_profile(folder, cfg.num_layers)
    print(f"SmolLM2-135M float32, quantized layers {layers}, {args.slots} slots, answers of up to {NIAH_NEW_TOKENS} tokens")
    print("| config | length | cases | found alone | found in the engine | same answer as alone | engine s | alone s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.configs:
        config = cache_config(name, layers)
        for length in args.lengths:
            cases = [build_niah(tokenizer, length, depth, case_seed(args.seed, length, depth), reserve=NIAH_NEW_TOKENS) for depth in args.depths]
            started = time.perf_counter()
            alone = [dj.generate(params, cfg, [c.tokens], max_new_tokens=NIAH_NEW_TOKENS, cache=config).token_lists()[0] for c in cases]
            alone_s = time.perf_counter() - started
            started = time.perf_counter()
            engine = Engine(pair, slots=args.slots, max_len=length, max_new_tokens=NIAH_NEW_TOKENS, cache=config)
            for case in cases:
                engine.submit(case.tokens, max_new_tokens=NIAH_NEW_TOKENS)
            served = [r.tokens for r in engine.run()]
            engine_s = time.perf_counter() - started
            found_alone = sum(needle_found(c.answer, answer(tokenizer, t)) for c, t in zip(cases, alone))
            found_engine = sum(needle_found(c.answer, answer(tokenizer, t)) for c, t in zip(cases, served))
            same = sum(a == b for a, b in zip(alone, served))
            print(f"| {name} | {length} | {len(cases)} | {found_alone} | {found_engine} | {same} | {engine_s:.0f} | {alone_s:.0f} |", flush=True)
            for depth, c, a, b in zip(args.depths, cases, alone, served):
                if a != b:
                    print(f"  depth {depth}: alone {answer(tokenizer, a)!r}; engine {answer(tokenizer, b)!r} (needle {c.answer})")


if __name__ == "__main__":
    main()
