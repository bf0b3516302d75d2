"""Decode throughput: dami-jax ``generate`` vs transformers ``generate`` (torch), same model,
same prompts, greedy, a fixed number of new tokens, float32 (``--dtype bfloat16``: the GPU mode;
transformers runs on the GPU whenever torch sees one). Prints tokens/s and the ratio.

    python scripts/bench_decode.py [--model PATH] [--new-tokens 128] [--batch 1 8] [--repeats 3] [--dtype float32]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import torch

import dami_jax as dj
from dami_jax.evals.timing import call_times
from dami_jax.models.pinned import smollm2_checkpoint
from dami_jax.models.tokenizer import chat_tokens, load_tokenizer

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain photosynthesis in two sentences.",
    "List three uses of a paperclip.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "What does a CPU do?",
    "Describe a cat to someone who has never seen one.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder (default: pinned SmolLM2-135M-Instruct)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="both models' weights")
    args = parser.parse_args()

    path = args.model or smollm2_checkpoint()
    tokenizer = load_tokenizer(path)
    cfg, params = dj.load_checkpoint(path, dtype=np.dtype(args.dtype))
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(device).eval()
    n = args.new_tokens
    print(f"model {path}\njax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} on {device} "
          f"({torch.get_num_threads()} threads), {args.dtype}, greedy, {n} new tokens\n")  # fmt: skip
    rows = []
    for batch in args.batch:
        prompts = [chat_tokens(tokenizer, QUESTIONS[i % len(QUESTIONS)]) for i in range(batch)]

        def ours():
            return dj.generate(params, cfg, prompts, max_new_tokens=n, stop_tokens=[]).tokens

        width = max(map(len, prompts))
        ids = torch.full((batch, width), cfg.pad_token_id)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1

        ids, mask = ids.to(device), mask.to(device)

        def theirs():
            with torch.no_grad():
                hf.generate(
                    input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                    pad_token_id=cfg.pad_token_id,
                ).cpu()  # waits for the device

        t_ours, t_theirs = min(call_times(ours, args.repeats)), min(call_times(theirs, args.repeats))
        rows.append((batch, batch * n / t_ours, batch * n / t_theirs))
        print(f"batch {batch}: dami-jax {rows[-1][1]:8.1f} tok/s   transformers {rows[-1][2]:8.1f} tok/s")
    print()
    for batch, ours_tps, theirs_tps in rows:
        print(f"ratio dami-jax / transformers, batch {batch}: {ours_tps / theirs_tps:.2f}x")


if __name__ == "__main__":
    main()
