"""The DAMI commands: ``sweep``, ``diagnose``, ``train-router`` and ``route-eval``."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

from dami_jax.cli.common import (
    MIXES, ROUTERS, TRACES, Command, Interrupted, UsageError, add_benchmark, add_cache, add_models, add_pair, add_processes,
    add_style, check_lambdas, check_pair_args, fraction, join_processes, keeps, nonnegative_float, nonnegative_int, open_fraction,
    out_folder, pair_cache_config, pair_from, positive_float, positive_int, processes_from, prompt_style, sampling_from, start_fresh,
)
from dami_jax.evals.records import ResultsFolder

def _sweep_config(args: argparse.Namespace):
    """The answering settings shared by sweep and route-eval, checked."""
    check_pair_args(args)
    check_lambdas(args.lambdas, args.extrapolate)
    toy = args.benchmark == "toy"
    if toy and args.limit is not None:
        raise UsageError("--limit picks the first N problems of a named benchmark; the toy benchmark takes --n-per-level")
    if not toy and args.n_per_level is not None:
        raise UsageError(f"--n-per-level sizes the toy benchmark; {args.benchmark} takes --limit")
    sampling = sampling_from(args)

    from dami_jax.evals.sweep import SweepConfig

    return SweepConfig(
        lambdas=args.lambdas, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, template=args.template,
        sampling=sampling, seed=args.seed, style=prompt_style(args), extrapolate=args.extrapolate,
        benchmark=args.benchmark,
    )  # fmt: skip


def _problems(args: argparse.Namespace):
    from dami_jax.evals.benchmarks import load_benchmark
    from dami_jax.toy.evaluation import toy_problems

    if args.benchmark == "toy":
        return toy_problems(args.n_per_level or 10, seed=args.seed)
    return load_benchmark(args.benchmark, limit=args.limit)


def _claim_settings(out: Path, fresh: bool, settings: dict[str, Any], split: bool = False) -> None:
    """--fresh moves earlier results aside (process 0 of a split job, while the others wait);
    otherwise other settings are refused before the pair loads (the models' hashes, and a TailorKV
    cache, whose split comes from the models' layer profiles, are checked after)."""
    from dami_jax.distributed import barrier, leader

    if fresh and leader():
        start_fresh(out)
    if fresh and split:
        barrier(f"fresh {out}")
    if not fresh:
        ResultsFolder(out).check({k: v for k, v in settings.items() if k != "cache"})


def _with_cache(config, args: argparse.Namespace, pair):
    """The sweep settings with --cache resolved for the loaded pair."""
    return dataclasses.replace(config, cache=pair_cache_config(args.cache, pair))


def _sweep(args: argparse.Namespace) -> None:
    config = _sweep_config(args)
    out = out_folder(args.out)
    processes = processes_from(args)

    from dami_jax.evals.frontier import format_table, frontier_shape, sweep_points
    from dami_jax.evals.plots import plot_frontier
    from dami_jax.evals.records import part_path
    from dami_jax.evals.sweep import RECORDS_FILE, run_sweep

    join_processes(processes)
    split = processes is not None
    _claim_settings(out, args.fresh, config.settings(), split)
    problems = _problems(args)
    pair = pair_from(args)
    config = _with_cache(config, args, pair)
    logs = (out / RECORDS_FILE, part_path(out / RECORDS_FILE, processes[2])) if split else (out / RECORDS_FILE,)
    with keeps("answers", *logs):
        records = run_sweep(pair, problems, out, config, split=split)
    if split and processes[2] != 0:
        print(f"dami-jax: process {processes[2]} of {processes[1]} answered its share; process 0 merged every share into "
              f"{out / RECORDS_FILE}", file=sys.stderr)  # fmt: skip
        return
    points = sweep_points(records)
    print(format_table(points))
    shape = frontier_shape(points)
    print(", ".join(f"{k.replace('_', ' ')}: {'yes' if v else 'no'}" for k, v in shape.items()))
    print("(the DAMI paper's pilot-study claims, checked on these points: accuracy never falls as lambda grows, and "
          "along the accuracy-vs-tokens frontier each extra token buys no more accuracy than the one before)")
    print(f"records: {out / RECORDS_FILE}\nfrontier plot: {plot_frontier(points, out / 'frontier.png')}")


def _diagnose(args: argparse.Namespace) -> None:
    check_pair_args(args)
    check_lambdas(args.lambdas, args.extrapolate)
    out = out_folder(args.out)

    import json

    import numpy as np

    from dami_jax.dami.diagnostics import loss_along_path, representation_continuity
    from dami_jax.evals.plots import plot_diagnostics
    from dami_jax.files import write_atomic
    from dami_jax.toy.evaluation import diagnostic_sequences

    pair = pair_from(args)
    sequences, masks = diagnostic_sequences(pair.tokenizers["thinking"], args.n_per_level, seed=args.seed, style=prompt_style(args),
                                            trace=args.trace)  # fmt: skip
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
    check_pair_args(args)
    folders = [_sweep_folder(path) for path in args.records]
    out = out_folder(args.out)

    from dami_jax.dami.features import FeatureSpec
    from dami_jax.dami.pref_router import TrainConfig
    from dami_jax.evals.router_training import train_router

    config = TrainConfig(hidden=args.hidden, learning_rate=args.learning_rate, max_epochs=args.epochs,
                         patience=args.patience, seed=args.seed)  # fmt: skip
    if args.fresh:
        start_fresh(out)
    pair = pair_from(args)
    started = time.perf_counter()
    try:
        router = train_router(pair, folders, out, spec=FeatureSpec(), config=config, margin=args.margin,
                              token_weight=args.token_weight)  # fmt: skip
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
    out = out_folder(args.out)

    from dami_jax.dami.conf_router import ConfMap
    from dami_jax.evals.paired import format_paired
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
    pair = pair_from(args)
    evaluation = dataclasses.replace(evaluation, sweep=_with_cache(config, args, pair))
    started = time.perf_counter()
    with keeps("answers", out / "sweep" / RECORDS_FILE, out / SIGNALS_FILE, out / ROUTED_FILE):
        report = route_eval(pair, problems, out, routers, evaluation)
    print(format_results(report["results"]))
    if report["paired"]:
        print(format_paired(report["paired"]))
    if report["sensitivity"] is not None:
        rows = sorted(report["sensitivity"], key=lambda r: (-r["accuracy"], r["mean_tokens"]))
        print(f"DAMI-Conf sensitivity ({len(rows)} settings), the five most accurate:")
        print("conf_weight  disc_weight  accept_below  floor  accuracy  mean tokens  accepted")
        for r in rows[:5]:
            print(f"{r['conf_weight']:11g}  {r['disc_weight']:11g}  {r['accept_below']:12g}  {r['floor']:5g}  "
                  f"{r['accuracy']:8.3f}  {r['mean_tokens']:11.1f}  {r['accept_rate']:8.2f}")  # fmt: skip
    print("\n".join(f"{name}: {path}" for name, path in report["files"].items()))
    print(f"{len(problems)} problems, {time.perf_counter() - started:.0f} s wall", file=sys.stderr)


def register(command: Command) -> None:
    sweep = command("sweep", "answer a benchmark across a lambda grid; table + Pareto frontier plot", _sweep)
    add_pair(sweep, "runs/sweep")
    add_benchmark(sweep)
    add_cache(sweep)
    sweep.add_argument("--fresh", action="store_true", help="move earlier results in --out aside and start over")
    add_processes(sweep, "each process answers its share of the (lambda, problem) cells on its own devices (--mesh: over "
                         "its own); process 0 merges the records into --out, which every process must reach")  # fmt: skip

    diag = command("diagnose", "representation continuity (CKA) and loss barrier along the path", _diagnose)
    add_pair(diag, "runs/diagnose")
    diag.add_argument("--delta", type=positive_float, metavar="X", default=0.05, help="lambda step for CKA(theta(lam), theta(lam+delta))")
    diag.add_argument("--n-per-level", type=positive_int, metavar="N", default=10, help="toy problems per difficulty level")
    diag.add_argument("--seed", type=nonnegative_int, metavar="N", default=0, help="which toy problems")
    add_style(diag)
    diag.add_argument("--trace", choices=TRACES, default="worked",
                      help="boxed style: the Thinking end's reference answer (worked = one line per step, the smollm2 pair's "
                           "Thinking; checked = steps then a check of each, smollm2-systems' System 2)")  # fmt: skip

    train = command("train-router", "DAMI-Pref: train a router on preference pairs from sweep records", _train_router)
    train.add_argument("--records", action="append", required=True, metavar="DIR",
                       help="a sweep folder (repeat to pool several); its router-training problems are used")  # fmt: skip
    add_models(train)
    train.add_argument("--margin", type=nonnegative_float, metavar="X", default=0.1,
                       help="between two correct answers, fewer tokens wins by more than this fraction")  # fmt: skip
    train.add_argument("--token-weight", type=open_fraction, metavar="X", default=1.0,
                       help="weight of a pair two correct answers make (fewer tokens wins) against a right-vs-wrong pair's 1; "
                            "below 1 puts accuracy first across problems the router cannot tell apart")  # fmt: skip
    train.add_argument("--hidden", type=nonnegative_int, metavar="N", default=128, help="router MLP width (0: a linear scorer)")
    train.add_argument("--learning-rate", type=positive_float, metavar="X", default=3e-3, help="AdamW peak learning rate")
    train.add_argument("--epochs", type=positive_int, metavar="N", default=300, help="most epochs")
    train.add_argument("--patience", type=positive_int, metavar="N", default=30, help="epochs without better validation routing")
    train.add_argument("--seed", type=nonnegative_int, metavar="N", default=0, help="initialization and shuffling")
    train.add_argument("--out", metavar="DIR", default="runs/router", help="router folder (orbax checkpoints, router.json)")
    train.add_argument("--fresh", action="store_true", help="move an earlier router in --out aside and start over")

    route = command("route-eval", "serve held-out problems at each router's lambdas; compare with fixed lambdas and the oracle", _route_eval)
    add_pair(route, "runs/route-eval")
    route.add_argument("--router", action="append", required=True, metavar="DIR|conf|oracle",
                       help="a train-router folder (DAMI-Pref), conf (DAMI-Conf) or oracle; repeat for several")  # fmt: skip
    add_benchmark(route)
    add_cache(route)
    route.add_argument("--mix", choices=MIXES, default="all", help="toy: weight the difficulty levels (uniform 1:1:..., easy-heavy 4:2:1:1:1:1)")
    route.add_argument("--size", type=positive_int, metavar="N", default=300, help="problems in a --mix")
    route.add_argument("--cost-weight", type=nonnegative_float, metavar="X", default=0.0, help="DAMI-Pref: trade accuracy for tokens")
    route.add_argument("--conf-weight", type=nonnegative_float, metavar="X", default=1.0, help="DAMI-Conf: weight of (1 - confidence)")
    route.add_argument("--disc-weight", type=nonnegative_float, metavar="X", default=1.0, help="DAMI-Conf: weight of the discrepancy")
    route.add_argument("--accept-below", type=nonnegative_float, metavar="X", default=0.1, help="DAMI-Conf: risk under which the draft is the answer")
    route.add_argument("--floor", type=fraction, metavar="X", default=0.5, help="DAMI-Conf: least lambda when the draft is not accepted")
    route.add_argument("--max-draft-tokens", type=positive_int, metavar="N", default=32, help="DAMI-Conf: the draft's budget")
    route.add_argument("--fresh", action="store_true", help="move earlier results in --out aside and start over")
