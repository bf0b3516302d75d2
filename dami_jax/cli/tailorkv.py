"""The TailorKV commands: ``profile-layers`` and ``niah``."""

from __future__ import annotations

import argparse
import sys
import time

from dami_jax.cli.common import (
    CACHES, MODEL_HELP, NIAH_CONFIGS, NIAH_DEPTHS, TOKEN_SCORES, Command, UsageError, checkpoint_folder, fraction, keeps,
    nonnegative_int, open_fraction, out_folder, positive_int, start_fresh,
)
from dami_jax.evals.records import ResultsFolder

def _profile_layers(args: argparse.Namespace) -> None:
    out = out_folder(args.out)
    model = checkpoint_folder(args.model, "MODEL")

    from dami_jax.evals.calibration import profile_checkpoint
    from dami_jax.evals.plots import plot_profile
    from dami_jax.tailorkv.profiling import PROFILE_FILE, format_profile

    started = time.perf_counter()
    profile = profile_checkpoint(model, tau=args.tau, max_tokens=args.max_tokens, alpha=args.alpha, last_q=args.last_q)
    elapsed = time.perf_counter() - started
    print(format_profile(profile))
    print(f"profile: {profile.save(out / PROFILE_FILE)}\nplot: {plot_profile(profile, out / 'layer_profile.png')}")
    print(f"{profile.num_tokens} calibration tokens in {elapsed:.1f} s (loading and compilation included)", file=sys.stderr)


def _niah(args: argparse.Namespace) -> None:
    out = out_folder(args.out)
    model = checkpoint_folder(args.model, "--model")

    from dami_jax.evals.calibration import quantized_layers_or_profile
    from dami_jax.evals.niah.run import LOG_FILE, REQUIRED_SETTINGS, niah_settings, run_niah
    from dami_jax.models.config import read_hf_config

    cfg = read_hf_config(model)
    positions = cfg.max_position_embeddings
    if max(args.lengths) > positions:
        raise UsageError(f"--lengths: {max(args.lengths)} tokens exceed the model's {positions} positions")
    if not args.fresh:  # stale results are refused before a layer profile is made (run_niah checks the rest)
        ResultsFolder(out).check(niah_settings(model, (), args.max_new_tokens, args.kl_tokens, args.seed, None), REQUIRED_SETTINGS)
    quantized_layers = args.quantized_layers
    if quantized_layers is None and set(args.configs) & set(CACHES.values()):  # a TailorKV preset runs
        quantized_layers = quantized_layers_or_profile(model, cfg.num_layers)
    if args.fresh:
        start_fresh(out)
    started = time.perf_counter()
    with keeps("cases", out / LOG_FILE):
        run_niah(
            model, lengths=args.lengths, depths=args.depths, configs=args.configs, out_dir=out,
            max_new_tokens=args.max_new_tokens, kl_tokens=args.kl_tokens, seed=args.seed,
            quantized_layers=quantized_layers, token_score=args.token_score, torch_threads=args.torch_threads,
        )  # fmt: skip
    print(f"records: {out / LOG_FILE}\nplot: {out / 'niah.png'}\n{time.perf_counter() - started:.0f} s wall")


def register(command: Command) -> None:
    prof = command("profile-layers", "TailorKV: score each layer's attention density, split dense/sparse", _profile_layers)
    prof.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    prof.add_argument("--tau", type=fraction, metavar="X", default=0.2, help="score above which a layer is dense (quantized)")
    prof.add_argument("--max-tokens", type=positive_int, metavar="N",
                      help="keep only the last N tokens of the calibration prompt (50 GSM8K worked examples and a "
                           "question; default: all of it, up to the model's positions)")  # fmt: skip
    prof.add_argument("--alpha", type=open_fraction, metavar="X", default=0.05, help="top fraction of keys kept per query")
    prof.add_argument("--last-q", type=positive_int, metavar="N", default=32, help="queries scored, from the prompt's end")
    prof.add_argument("--out", metavar="DIR", default="runs/layer-profile", help="output folder (layer_profile.json + plot)")

    niah = command("niah", "needle in a haystack: accuracy, top-1 agreement and KL of KV caches vs dense", _niah)
    niah.add_argument("--model", metavar="MODEL", default="smollm2", help=MODEL_HELP)
    niah.add_argument("--lengths", type=positive_int, nargs="+", metavar="N", default=[2048, 4096, 8192], help="context lengths (tokens)")
    niah.add_argument("--depths", type=fraction, nargs="+", metavar="X", default=list(NIAH_DEPTHS), help="needle depths")
    niah.add_argument("--configs", nargs="+", choices=NIAH_CONFIGS, default=list(NIAH_CONFIGS), help="KV caches")
    niah.add_argument("--quantized-layers", type=nonnegative_int, nargs="*", metavar="N",
                      help="TailorKV's quantized layers (default: the model's layer profile, made on first use "
                           "for smollm2, or its published split)")  # fmt: skip
    niah.add_argument("--token-score", choices=TOKEN_SCORES, default=TOKEN_SCORES[0],
                      help="how TailorKV's sparse layers rank prompt tokens: group_mean (the reference's) or head_max")  # fmt: skip
    niah.add_argument("--max-new-tokens", type=positive_int, metavar="N", default=48,
                      help="answer length for accuracy (a UUID needle takes about 35 SmolLM2 tokens)")  # fmt: skip
    niah.add_argument("--kl-tokens", type=positive_int, metavar="N", default=64,
                      help="dense greedy tokens the caches are compared along (top-1, KL, free-running agreement)")  # fmt: skip
    niah.add_argument("--seed", type=nonnegative_int, metavar="N", default=0, help="which needles (forms, keys, values)")
    niah.add_argument("--torch-threads", type=positive_int, metavar="N", help="torch threads for the quanto configs")
    niah.add_argument("--out", metavar="DIR", default="runs/niah", help="output folder (niah.jsonl, summary.txt, niah.png)")
    niah.add_argument("--fresh", action="store_true", help="move earlier results in --out aside and start over")
