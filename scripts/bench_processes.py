"""The engine over two processes (``jax.distributed``), against one process on the same mesh:

1. one process, 4 virtual CPU devices, the toy pair tensor-parallel over them (the baseline);
2. two processes of 2 devices each, every process submitting the same requests (``dj.serve``'s
   way across processes: no messages between steps);
3. two processes in lockstep, as ``dami-jax serve`` runs: process 0 takes the requests and shares
   each step's commands (:mod:`dami_jax.engine.lockstep`), process 1 follows.

Same requests (mixed lambdas, greedy, float32), same mesh shape; tok/s against the baseline,
whether the tokens are the same, and what one share costs (a broadcast of nothing new). On 2
CPU cores the processes share the cores and talk over gloo: this measures the overhead of
spanning processes, not a speed-up.

    python scripts/bench_processes.py [--requests 24] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import jax

import dami_jax as dj
from dami_jax.distributed import broadcast, initialize
from dami_jax.engine.engine import Engine
from dami_jax.engine.lockstep import Leader, follow
from dami_jax.evals.prompts import prompt_tokens
from dami_jax.toy.evaluation import toy_problems

LAMBDAS = (0.0, 1.0, 0.3, 0.5, 0.8)
MODES = {"one process": (1, "alone"), "two processes, each submitting": (2, "spmd"), "two processes in lockstep": (2, "lockstep")}
SHARES = 200  # empty shares timed


def worker(mode: str, requests: int, new_tokens: int, coordinator: str | None, count: int, index: int) -> dict:
    if coordinator is not None:
        initialize(coordinator, count, index)
    pair = dj.load_toy_pair()
    engine = Engine(pair, slots=8, max_len=256, mesh=dj.make_mesh())
    engine.warmup()
    prompts = [prompt_tokens(pair.tokenizers["thinking"], p, "toy") for p in toy_problems(5, seed=11)][:requests]
    share_ms = None
    if mode == "lockstep" and index != 0:
        follow(engine)
        return {}
    started = time.perf_counter()
    if mode == "lockstep":
        leader = Leader()
        for i, prompt in enumerate(prompts):
            options = {"prompt": prompt, "lam": LAMBDAS[i % len(LAMBDAS)], "max_new_tokens": new_tokens, "stop_tokens": []}
            engine.submit(**options)
            leader.submitted(options)
        results = []
        while not engine.idle:
            leader.share()
            results += [event.result for event in engine.step() if event.result is not None]
        elapsed = time.perf_counter() - started
        clock = time.perf_counter()
        for _ in range(SHARES):
            leader.share()
        share_ms = (time.perf_counter() - clock) / SHARES * 1e3
        leader.stop()
    else:
        for i, prompt in enumerate(prompts):
            engine.submit(prompt, lam=LAMBDAS[i % len(LAMBDAS)], max_new_tokens=new_tokens, stop_tokens=[])
        results = list(engine.results())
        elapsed = time.perf_counter() - started
    if mode == "spmd":
        broadcast(b"" if index == 0 else None)  # the processes finish together
    tokens = [list(r.tokens) for r in sorted(results, key=lambda r: r.id)]
    return {"tok_s": sum(map(len, tokens)) / elapsed, "tokens": tokens, "share_ms": share_ms, "devices": jax.device_count()}


def launch(mode: str, count: int, args: argparse.Namespace) -> dict:
    """Run ``mode`` in ``count`` processes of 4 // count virtual devices; process 0's report."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={4 // count}"}
    processes = []
    for index in range(count):
        argv = [sys.executable, __file__, "--worker", mode, "--requests", str(args.requests), "--new-tokens", str(args.new_tokens)]
        if count > 1:
            argv += ["--coordinator", coordinator, "--num-processes", str(count), "--process-id", str(index)]
        processes.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outputs = [p.communicate(timeout=args.timeout) for p in processes]
    for p, (_, err) in zip(processes, outputs):
        if p.returncode:
            raise SystemExit(f"{mode}: a process failed:\n{err[-3000:]}")
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=600, help="seconds each run may take")
    parser.add_argument("--worker", choices=[mode for _, mode in MODES.values()], help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    parser.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.requests, args.new_tokens, args.coordinator, args.num_processes, args.process_id)))
        return
    reports = {name: launch(mode, count, args) for name, (count, mode) in MODES.items()}
    base = reports["one process"]
    print(f"toy pair, {args.requests} requests x {args.new_tokens} tokens at lambdas {LAMBDAS}, 8 slots, mesh of 4 devices")
    print(f"{'':32} {'tok/s':>8} {'vs one':>7}  same tokens")
    for name, report in reports.items():
        print(f"{name:32} {report['tok_s']:8.1f} {report['tok_s'] / base['tok_s']:6.2f}x  {report['tokens'] == base['tokens']}")
    print(f"one share with nothing new (a broadcast of its length): {reports['two processes in lockstep']['share_ms']:.2f} ms")


if __name__ == "__main__":
    main()
