"""``dami-jax`` command line: thin wrappers over the library."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax


def _model_path(model: str) -> Path | str:
    """'smollm2' names the pinned SmolLM2-135M-Instruct (converted once, cached); else an HF folder."""
    from dami_jax.assets import smollm2_checkpoint

    return smollm2_checkpoint() if model == "smollm2" else model


def _generate(args: argparse.Namespace) -> None:
    from dami_jax.checkpoint import load_checkpoint
    from dami_jax.generation import generate
    from dami_jax.sampling import Sampling
    from dami_jax.tokenizer import chat_tokens, load_tokenizer

    model = _model_path(args.model)
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


def _pair(args: argparse.Namespace):
    from dami_jax.pair import load_pair
    from dami_jax.toy import toy_pair_paths

    if (args.instruct is None) != (args.thinking is None):
        raise SystemExit("give both --instruct and --thinking, or neither (the embedded toy pair)")
    paths = (args.instruct, args.thinking) if args.instruct else toy_pair_paths()
    return load_pair(*paths, dtype=args.dtype)


def _problems(args: argparse.Namespace):
    from dami_jax.benchmarks import load_benchmark, toy_problems

    if args.benchmark == "toy":
        return toy_problems(args.n_per_level, seed=args.seed)
    return load_benchmark(args.benchmark, limit=args.limit)


def _lambdas(text: str) -> tuple[float, ...]:
    """'0:1:0.1' (inclusive grid) or '0,0.25,1'."""
    if ":" in text:
        start, stop, step = map(float, text.split(":"))
        count = int(round((stop - start) / step)) + 1
        return tuple(round(start + i * step, 6) for i in range(count))
    return tuple(float(x) for x in text.split(","))


def _sweep(args: argparse.Namespace) -> None:
    from dami_jax.frontier import format_table, frontier_shape, plot_frontier, summarize
    from dami_jax.sweep import SweepConfig, run_sweep

    pair, problems = _pair(args), _problems(args)
    config = SweepConfig(
        lambdas=_lambdas(args.lambdas), max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        template=args.template, style="toy" if args.benchmark == "toy" else "boxed", seed=args.seed,
    )  # fmt: skip
    out = Path(args.out)
    records = run_sweep(pair, problems, out / "records.jsonl", config)
    points = summarize(records)
    print(format_table(points))
    shape = frontier_shape(points)
    print(", ".join(f"{k.replace('_', ' ')}: {'yes' if v else 'no'}" for k, v in shape.items()))
    print(f"records: {out / 'records.jsonl'}\nfrontier plot: {plot_frontier(points, out / 'frontier.png')}")


def _diagnose(args: argparse.Namespace) -> None:
    from dami_jax.diagnostics import loss_along_path, plot_diagnostics, representation_continuity
    from dami_jax.toy import diagnostic_sequences

    pair = _pair(args)
    lambdas = _lambdas(args.lambdas)
    sequences, masks = diagnostic_sequences(pair.tokenizers["thinking"], args.n_per_level, seed=args.seed)
    continuity = representation_continuity(pair, sequences, lambdas, delta=args.delta)
    connectivity = loss_along_path(pair, sequences, masks, lambdas)
    print("lambda  CKA(next) min/mean  CKA(instruct) mean  CKA(thinking) mean  held-out loss  straight line")
    for i, lam in enumerate(continuity.lambdas):
        j = connectivity.lambdas.index(lam)
        print(f"{lam:6.2f}  {continuity.next_cka[i].min():8.3f} / {continuity.next_cka[i].mean():.3f}"
              f"  {continuity.instruct_cka[i].mean():18.3f}  {continuity.thinking_cka[i].mean():18.3f}"
              f"  {connectivity.losses[j]:13.4f}  {connectivity.linear[j]:13.4f}")  # fmt: skip
    print(f"loss barrier: {connectivity.barrier:+.4f} nats/token")
    print(f"plot: {plot_diagnostics(continuity, connectivity, Path(args.out) / 'diagnostics.png')}")


def _profile_layers(args: argparse.Namespace) -> None:
    from dami_jax.profiling import PROFILE_FILE, format_profile, plot_profile, profile_checkpoint

    model = _model_path(args.model)
    started = time.perf_counter()
    profile = profile_checkpoint(model, tau=args.tau, max_tokens=args.max_tokens, alpha=args.alpha, last_q=args.last_q)
    elapsed = time.perf_counter() - started
    print(format_profile(profile))
    out = Path(args.out)
    print(f"profile: {profile.save(out / PROFILE_FILE)}\nplot: {plot_profile(profile, out / 'layer_profile.png')}")
    print(f"{profile.num_tokens} calibration tokens in {elapsed:.1f} s (loading and compilation included)")


def _niah(args: argparse.Namespace) -> None:
    from dami_jax.niah import run_niah

    model = _model_path(args.model)
    started = time.perf_counter()
    run_niah(
        model, lengths=args.lengths, depths=args.depths, configs=args.configs, out_dir=args.out,
        max_new_tokens=args.max_new_tokens, kl_tokens=args.kl_tokens, seed=args.seed, quantized_layers=args.quantized_layers,
        torch_threads=args.torch_threads,
    )  # fmt: skip
    out = Path(args.out)
    print(f"records: {out / 'niah.jsonl'}\nheat map: {out / 'niah.png'}\n{time.perf_counter() - started:.0f} s wall")


def _add_pair_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instruct", help="Instruct (System 1) HF folder; default: the embedded toy pair")
    parser.add_argument("--thinking", help="Thinking (System 2) HF folder")
    parser.add_argument("--dtype", default=None, help="cast weights, e.g. bfloat16")
    parser.add_argument("--lambdas", default="0:1:0.1", help="grid 'start:stop:step' or list '0,0.5,1'")
    parser.add_argument("--n-per-level", type=int, default=10, help="toy problems per difficulty level")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/sweep", help="output folder")


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

    sweep = sub.add_parser("sweep", help="answer a benchmark across a lambda grid; table + Pareto frontier plot")
    _add_pair_args(sweep)
    sweep.add_argument("--benchmark", default="toy", help="'toy' or a dami_jax.benchmarks name (e.g. gsm8k-offline)")
    sweep.add_argument("--limit", type=int, default=None, help="first N problems of a named benchmark")
    sweep.add_argument("--max-new-tokens", type=int, default=160)
    sweep.add_argument("--batch-size", type=int, default=64)
    sweep.add_argument("--template", default="thinking", choices=("thinking", "instruct", "nearest"))
    sweep.set_defaults(run=_sweep)

    diag = sub.add_parser("diagnose", help="representation continuity (CKA) and loss barrier along the path")
    _add_pair_args(diag)
    diag.add_argument("--delta", type=float, default=0.05, help="lambda step for CKA(theta(lam), theta(lam+delta))")
    diag.set_defaults(run=_diagnose)

    prof = sub.add_parser("profile-layers", help="TailorKV: score each layer's attention density, split dense/sparse")
    prof.add_argument("model", help="HF checkpoint folder, or 'smollm2' for the pinned SmolLM2-135M-Instruct")
    prof.add_argument("--tau", type=float, default=0.2, help="score above which a layer is dense (quantized)")
    prof.add_argument("--max-tokens", type=int, default=2048, help="calibration prompt length (GSM8K few-shot)")
    prof.add_argument("--alpha", type=float, default=0.05, help="top fraction of keys kept per query")
    prof.add_argument("--last-q", type=int, default=32, help="queries scored, from the prompt's end")
    prof.add_argument("--out", default="runs/layer-profile", help="output folder (layer_profile.json + plot)")
    prof.set_defaults(run=_profile_layers)

    niah = sub.add_parser("niah", help="needle in a haystack: accuracy, agreement and KL of KV caches vs dense")
    niah.add_argument("--model", default="smollm2", help="HF folder, or 'smollm2' (pinned SmolLM2-135M-Instruct)")
    niah.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192], help="context lengths (tokens)")
    niah.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9], help="needle depths (0-1)")
    niah.add_argument("--configs", nargs="+", default=["dense", "TailorKV-1", "TailorKV-2", "quanto-2", "quanto-4"],
                      help="caches: dense, TailorKV-1, TailorKV-2, quanto-2, quanto-4")  # fmt: skip
    niah.add_argument("--quantized-layers", type=int, nargs="*", default=None,
                      help="TailorKV's quantized layers (default: the model's layer profile or built-in split)")
    niah.add_argument("--max-new-tokens", type=int, default=32, help="answer length for accuracy")
    niah.add_argument("--kl-tokens", type=int, default=64, help="greedy tokens compared with dense (agreement, KL)")
    niah.add_argument("--seed", type=int, default=0)
    niah.add_argument("--torch-threads", type=int, default=None, help="torch threads for the quanto configs")
    niah.add_argument("--out", default="runs/niah", help="output folder (niah.jsonl, summary.txt, niah.png)")
    niah.set_defaults(run=_niah)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
