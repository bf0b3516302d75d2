"""KV bytes one engine slot holds, on the device and in host memory: dense against TailorKV-1 and
TailorKV-2, at 8k and 32k tokens per slot (issue 25's first benchmark).

Counted from the arrays the engine allocates for a slot (``dami_jax.engine.memory.dense_slot_bytes``
and ``dami_jax.engine.tailorkv_slots.tailorkv_slot_bytes``, the functions the engine sizes itself
with; tests/engine/test_tailorkv_engine.py checks that they equal what a built engine holds), so
no model is loaded and it runs in seconds on any machine. Models: SmolLM2-135M (our pinned pairs'
architecture) and Qwen3-4B (Qwen3-4B-Instruct-2507 / -Thinking-2507), both in bfloat16 as served
on a GPU; TailorKV's split: layer 0 quantized (the paper's, and SmolLM2's profile), the rest sparse.

    python scripts/bench_engine_kv.py [--max-new-tokens 256]
"""

from __future__ import annotations

import argparse
import dataclasses

import jax.numpy as jnp

from dami_jax.engine.memory import dense_slot_bytes
from dami_jax.engine.tailorkv_slots import tailorkv_slot_bytes
from dami_jax.models.config import ModelConfig
from dami_jax.tailorkv.cache import TAILORKV_1, TAILORKV_2

# The architectures' KV shapes (their transformers config.json: layers, KV heads, head size).
MODELS = {
    "SmolLM2-135M": ModelConfig(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=32768),
    "Qwen3-4B": ModelConfig(architecture="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                            num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=262144),
}  # fmt: skip
CONTEXTS = (8192, 32768)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the engine's max_new_tokens (TailorKV's device store of generated tokens)")
    args = parser.parse_args()
    dtype = jnp.dtype(jnp.bfloat16)
    print(f"| model | tokens per slot | cache | device MB per slot | host MB per slot | device vs dense |\n|---|---|---|---|---|---|")
    for name, cfg in MODELS.items():
        for context in CONTEXTS:
            dense, _ = dense_slot_bytes(cfg, dtype.itemsize)(context)
            print(f"| {name} | {context} | dense | {dense / 1e6:.1f} | 0 | 1.0x |")
            for label, preset in (("TailorKV-1", TAILORKV_1), ("TailorKV-2", TAILORKV_2)):
                config = dataclasses.replace(preset, quantized_layers=(0,))
                device, host = tailorkv_slot_bytes(cfg, config, args.max_new_tokens, dtype)(context)
                print(f"| {name} | {context} | {label} | {device / 1e6:.1f} | {host / 1e6:.1f} | {dense / device:.1f}x less |")


if __name__ == "__main__":
    main()
