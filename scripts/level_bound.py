"""The hindsight bound of level-wise routing on a route-eval folder (dami_jax/evals/level_bound.py):
the most accurate one-lambda-per-level choice on its evaluation problems at each token ratio of
Thinking's (lambda 1) tokens, beside Thinking's accuracy.

    python scripts/level_bound.py runs/route-eval --ratio 0.7 --ratio 0.85 --ratio 1
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

from dami_jax.evals.level_bound import best_per_level
from dami_jax.evals.records import JsonlLog
from dami_jax.evals.route_eval import ROUTED_FILE, SWEEP_DIR
from dami_jax.evals.stats import format_interval
from dami_jax.evals.sweep import RECORDS_FILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a route-eval folder (its evaluation problems are those its routers answered)")
    parser.add_argument("--ratio", type=float, action="append", required=True, help="token budget as a multiple of Thinking's tokens")
    args = parser.parse_args()
    folder = Path(args.folder)
    ids = {r["id"] for r in JsonlLog(folder / ROUTED_FILE).records}
    records = [r for r in JsonlLog(folder / SWEEP_DIR / RECORDS_FILE).records if r["id"] in ids]
    answered = collections.Counter(round(float(r["lambda"]), 6) for r in records)
    grid = sorted(lam for lam, count in answered.items() if count == len(ids))
    thinking = [r for r in records if r["lambda"] == 1.0]
    correct, tokens = sum(r["correct"] for r in thinking), sum(r["output_tokens"] for r in thinking)
    print(f"{len(ids)} problems, grid {grid}; Thinking: {correct / len(ids):.3f} {format_interval(correct / len(ids), len(ids))} at {tokens / len(ids):.1f} tokens")
    for ratio in args.ratio:
        best = best_per_level(records, grid, ratio * tokens)
        if best is None:
            print(f"<= {ratio:g}x: no choice fits")
            continue
        lambdas = ", ".join(f"{level} {lam:g}" for level, lam in best.lambdas.items())
        print(f"<= {ratio:g}x: {best.correct / best.n:.3f} {format_interval(best.correct / best.n, best.n)} at {best.tokens / best.n:.1f} tokens "
              f"({best.tokens / tokens:.2f}x), {best.correct - correct:+d} problems vs Thinking; lambdas: {lambdas}")  # fmt: skip


if __name__ == "__main__":
    main()
