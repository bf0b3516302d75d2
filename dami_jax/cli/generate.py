"""``dami-jax generate``: chat with a checkpoint (dense or TailorKV cache)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dami_jax.cli.common import (
    CACHES, DTYPES, MODEL_HELP, Command, UsageError, add_sampling, checkpoint_folder, dtype_of, positive_int, preset_for, sampling_from,
)

def _cache_config(name: str, model: Path, cfg):
    from dami_jax.decoding.cache import DenseCacheConfig
    from dami_jax.evals.calibration import quantized_layers_or_profile

    if CACHES[name] is None:
        return DenseCacheConfig()
    return preset_for(name, cfg, quantized_layers_or_profile(model, cfg.num_layers))


def _generate(args: argparse.Namespace) -> None:
    sampling = sampling_from(args)
    if args.stream and len(args.prompt) > 1:
        raise UsageError(f"--stream shows one answer as it is written; got {len(args.prompt)} prompts")
    model = checkpoint_folder(args.model, "MODEL")

    import jax

    from dami_jax.decoding.generation import generate, stream_text
    from dami_jax.models.checkpoint import load_checkpoint
    from dami_jax.models.config import read_hf_config
    from dami_jax.models.tokenizer import chat_tokens, load_tokenizer

    cache = _cache_config(args.cache, model, read_hf_config(model))
    tokenizer = load_tokenizer(model)
    prompts = [tokenizer.encode(p) if args.raw else chat_tokens(tokenizer, p) for p in args.prompt]
    cfg, params = load_checkpoint(model, dtype=dtype_of(args.dtype))
    longest = max(map(len, prompts))
    if longest + args.max_new_tokens > cfg.max_position_embeddings:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: with the longest prompt ({longest} tokens) it exceeds "
                         f"the model's {cfg.max_position_embeddings} positions")  # fmt: skip
    options = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, key=jax.random.key(args.seed), cache=cache)
    started = time.perf_counter()
    if args.stream:
        print(f">>> {args.prompt[0]}")
        for piece in stream_text(params, cfg, tokenizer, prompts[0], **options):
            print(piece, end="", flush=True)
        print()
        done = "answered"
    else:
        rows = generate(params, cfg, prompts, **options).token_lists()
        for prompt, row in zip(args.prompt, rows):
            print(f">>> {prompt}\n{tokenizer.decode(row, skip_special_tokens=True).strip()}\n")
        done = f"{sum(map(len, rows))} tokens"
    print(f"{done} in {time.perf_counter() - started:.1f} s (compilation included)", file=sys.stderr)


def register(command: Command) -> None:
    gen = command("generate", "chat with a checkpoint", _generate)
    gen.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    gen.add_argument("prompt", nargs="+", help="one or more user messages (batched)")
    gen.add_argument("--max-new-tokens", type=positive_int, metavar="N", default=128, help="most tokens per answer")
    add_sampling(gen, "PRNG seed for sampling")
    gen.add_argument("--stream", action="store_true", help="print the answer as it is written (one prompt)")
    gen.add_argument("--cache", choices=tuple(CACHES), default="dense",
                     help="KV cache; TailorKV needs the model's layer profile (dami-jax profile-layers; "
                          "smollm2 is profiled on first use) or a published split")  # fmt: skip
    gen.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: as stored)")
    gen.add_argument("--raw", action="store_true", help="no chat template")
