"""Start a tight-budget sweep folder from a greedy sweep at a larger budget: answers that ended
before the new budget are copied (greedy decoding gives them again), the rest are left for
``dami-jax sweep`` to answer. See dami_jax/evals/budget.py.

    python scripts/seed_budget_sweep.py SOURCE TARGET --max-new-tokens 184
    dami-jax sweep ...the source's flags... --max-new-tokens 184 --out TARGET   # answers only the rest
"""

from __future__ import annotations

import argparse

from dami_jax.evals.budget import seed_budget_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a greedy sweep folder")
    parser.add_argument("target", help="the new sweep folder (must not hold a sweep)")
    parser.add_argument("--max-new-tokens", type=int, required=True, help="the new, smaller budget")
    args = parser.parse_args()
    copied = seed_budget_sweep(args.source, args.target, args.max_new_tokens)
    print(f"{copied} answers copied into {args.target}; sweep it at --max-new-tokens {args.max_new_tokens} to answer the rest")


if __name__ == "__main__":
    main()
