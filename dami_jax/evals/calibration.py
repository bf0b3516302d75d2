"""TailorKV layer profiling of a checkpoint on benchmark calibration text.

The profiling rule itself (dense preference scores, the split, saved profiles) is
:mod:`dami_jax.tailorkv.profiling`; this module supplies the data it runs on (few-shot GSM8K,
offline) and profiles a checkpoint folder end to end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dami_jax.evals.benchmarks import load_benchmark
from dami_jax.models.checkpoint import load_checkpoint
from dami_jax.models.tokenizer import load_tokenizer
from dami_jax.tailorkv.profiling import ALPHA, LAST_Q, TAU, LayerProfile, model_names, profile_layers


def calibration_text(num_pairs: int = 50, benchmark: str = "gsm8k-offline") -> str:
    """Few-shot GSM8K text, as the reference code calibrates with (offline: no hub needed)."""
    problems = load_benchmark(benchmark, limit=num_pairs)
    return "".join(f"Question: {p.question}\nAnswer: {p.answer}\n\n" for p in problems)


def calibration_tokens(tokenizer, max_tokens: int = 2048, num_pairs: int = 50) -> np.ndarray:
    """int32 [T <= max_tokens] ids of :func:`calibration_text` under the model's tokenizer."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    ids = tokenizer(calibration_text(num_pairs))["input_ids"][:max_tokens]
    return np.asarray(ids, np.int32)


def profile_checkpoint(
    path: str | Path,
    tau: float = TAU,
    max_tokens: int = 2048,
    alpha: float = ALPHA,
    last_q: int = LAST_Q,
    num_pairs: int = 50,
    progress: bool = True,
) -> LayerProfile:
    """Load an HF folder and its tokenizer, and profile it on the GSM8K calibration prompt (one
    prefill, compiled first; a progress bar names each stage)."""
    with tqdm(total=3, desc="profile-layers", unit="stage", disable=not progress) as bar:
        bar.set_postfix_str("loading the checkpoint")
        cfg, params = load_checkpoint(path)
        bar.update()
        bar.set_postfix_str("tokenizing the calibration text")
        tokens = calibration_tokens(load_tokenizer(path), max_tokens, num_pairs)
        bar.update()
        bar.set_postfix_str(f"scoring {cfg.num_layers} layers on {len(tokens)} tokens (compiling first)")
        calibration = f"gsm8k-offline, {num_pairs} question/answer pairs, first {len(tokens)} tokens"
        profile = profile_layers(params, cfg, tokens, alpha, last_q, tau, model_names(path)[0], calibration)
        bar.set_postfix_str("done")
        bar.update()
    return profile
