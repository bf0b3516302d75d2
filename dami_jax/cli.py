"""``dami-jax`` command line: thin wrappers over the library."""

from __future__ import annotations

import argparse
import time

import jax


def _generate(args: argparse.Namespace) -> None:
    from dami_jax.assets import smollm2_checkpoint
    from dami_jax.checkpoint import load_checkpoint
    from dami_jax.generate import generate
    from dami_jax.sampling import Sampling
    from dami_jax.tokenizer import chat_tokens, load_tokenizer

    model = smollm2_checkpoint() if args.model == "smollm2" else args.model
    cfg, params = load_checkpoint(model)
    tokenizer = load_tokenizer(model)
    prompts = [chat_tokens(tokenizer, p) if not args.raw else tokenizer.encode(p) for p in args.prompt]
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    started = time.perf_counter()
    out = generate(
        params, cfg, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, key=jax.random.key(args.seed)
    )
    rows = out.token_lists()
    elapsed = time.perf_counter() - started
    for prompt, row in zip(args.prompt, rows):
        print(f">>> {prompt}\n{tokenizer.decode(row, skip_special_tokens=True).strip()}\n")
    print(f"{sum(map(len, rows))} tokens in {elapsed:.1f} s (compilation included)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dami-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="chat with a checkpoint")
    gen.add_argument("model", help="HF checkpoint folder, or 'smollm2' for the pinned SmolLM2-135M-Instruct")
    gen.add_argument("prompt", nargs="+", help="one or more user messages (batched)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--raw", action="store_true", help="no chat template")
    gen.set_defaults(run=_generate)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
