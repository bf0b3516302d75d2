"""One job over several processes (``jax.distributed``), as users launch it: two ``dami-jax``
processes on 127.0.0.1 (free ports), two virtual CPU devices each, collectives over gloo.

- a sweep split over two processes writes the records one process writes, merged into one
  folder; after a process dies, rerunning the job answers only what is missing;
- a server over two processes (process 0 takes the requests, process 1 follows its engine), with
  dense or TailorKV slots, answers as ``dj.generate`` does alone, and both stop when process 0 does;
- ``dj.serve`` called by every process of a job gives the single-process tokens: dense on a mesh
  over all four devices, TailorKV with the KV heads split over the processes.
Every process runs under a deadline and is killed at the end whatever happens."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jax
import numpy as np
import pytest

import dami_jax as dj
from dami_jax.cli.common import pair_cache_config
from dami_jax.decoding.sampling import Sampling
from dami_jax.engine.lockstep import native, portable
from dami_jax.evals.prompts import prompt_tokens
from dami_jax.evals.records import part_paths
from dami_jax.evals.sweep import owner
from dami_jax.models.tokenizer import chat_tokens
from dami_jax.toy.evaluation import toy_problems

pytestmark = pytest.mark.xdist_group("processes")  # two processes of 2 devices each: one such job at a time

HOST = "127.0.0.1"
DEADLINE_S = 480  # per job: start, compile, work (on 2 busy cores)
# Each process: 2 virtual devices; float32 matmuls in full (the single-device references use it too).
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
SWEEP = ["sweep", "--n-per-level", "2", "--lambdas", "0,0.5,1", "--max-new-tokens", "40", "--batch-size", "2"]
QUESTIONS = [p.question for p in toy_problems(6, seed=3)][:8]
LAMBDAS = [0.0, 1.0, 0.5, 0.3, 0.7, 1.0, 0.0, 0.9]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Job:
    """``count`` processes of ``command`` (a list of arguments, or one per process), joined by
    --coordinator/--num-processes/--process-id; killed on exit."""

    def __init__(self, command: list[str] | list[list[str]], count: int = 2, cli: bool = True):
        coordinator = f"{HOST}:{free_port()}"
        commands = command if isinstance(command[0], list) else [command] * count
        self.processes = []
        for index, args in enumerate(commands):
            argv = [sys.executable, "-m", "dami_jax.cli", *args] if cli else [sys.executable, "-c", *args]
            argv += ["--coordinator", coordinator, "--num-processes", str(count), "--process-id", str(index)]
            self.processes.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV))

    def wait(self, timeout_s: float = DEADLINE_S) -> list[tuple[int, str, str]]:
        """(exit code, stdout, stderr) of each process."""
        deadline = time.monotonic() + timeout_s
        outputs = []
        for process in self.processes:
            try:
                out, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                out, err = process.communicate()
            outputs.append((process.returncode, out, err))
        return outputs

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *_) -> None:
        self.kill()
        for process in self.processes:
            process.communicate()


def cli(*args: str) -> subprocess.CompletedProcess:
    """One ``dami-jax`` process (one device), as the reference."""
    done = subprocess.run([sys.executable, "-m", "dami_jax.cli", *args], capture_output=True, text=True, env=ENV, timeout=DEADLINE_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def answers(folder: Path) -> dict:
    """(lambda, id) -> everything a record says but its wall time."""
    records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    return {(r["lambda"], r["id"]): {k: v for k, v in r.items() if k != "wall_s"} for r in records}


def test_commands_cross_to_followers_as_they_were_given():
    key = jax.random.key(7)
    options = {"prompt": np.asarray([3, 4, 5]), "lam": 0.25, "max_new_tokens": 9, "sampling": Sampling(0.7, 5, 0.9), "key": key,
               "stop_tokens": (2,)}  # fmt: skip
    back = native(json.loads(json.dumps(portable(options))))
    assert back["prompt"] == [3, 4, 5] and back["sampling"] == Sampling(0.7, 5, 0.9) and back["stop_tokens"] == [2]
    np.testing.assert_array_equal(jax.random.key_data(back["key"]), jax.random.key_data(key))
    assert back["lam"] == 0.25 and back["max_new_tokens"] == 9
    greedy = native(json.loads(json.dumps(portable({"prompt": [1], "sampling": Sampling(), "key": None}))))
    assert greedy["key"] is None and greedy["sampling"] == Sampling()


def test_the_shares_of_a_split_sweep_cover_every_cell_once():
    cells = [(lam, f"toy-{i}") for lam in (0.0, 0.5, 1.0) for i in range(40)]
    shares = [[c for c in cells if owner(*c, 3) == p] for p in range(3)]
    assert sorted(c for share in shares for c in share) == sorted(cells)
    assert min(map(len, shares)) >= 25  # even enough: 40 each on average
    assert all(owner(*c, 1) == 0 for c in cells)


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["dense", "tailorkv-1"])
def test_a_sweep_split_over_two_processes_writes_what_one_process_writes(tmp_path, cache):
    one, two = tmp_path / "one", tmp_path / "two"
    cli(*SWEEP, "--cache", cache, "--out", str(one))
    with Job([*SWEEP, "--cache", cache, "--out", str(two)]) as job:
        (code0, out0, err0), (code1, _, err1) = job.wait()
    assert code0 == 0 and code1 == 0, (err0[-2000:], err1[-2000:])
    assert "process 1 of 2 answered its share" in err1 and "accuracy" in out0  # process 0 prints the table
    bars = [re.findall(r"(\d+)/(\d+) \[", err)[-1] for err in (err0, err1)]  # each progress bar's last count / total
    assert all(done == share for done, share in bars)
    assert sum(int(share) for _, share in bars) == 36 and min(int(share) for _, share in bars) >= 12  # its share
    assert answers(two) == answers(one)
    assert not part_paths(two / "records.jsonl")  # merged
    assert json.loads((two / "settings.json").read_text()) == json.loads((one / "settings.json").read_text())


@pytest.mark.slow
def test_after_a_process_dies_the_rerun_answers_only_what_is_missing(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    cli(*SWEEP, "--out", str(one))
    part = two / "records.process1.jsonl"
    with Job([*SWEEP, "--out", str(two)]) as job:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline and not (part.exists() and part.read_text().count("\n") >= 2):
            time.sleep(0.2)
        job.processes[1].kill()  # process 1 dies; the job goes down with it
        job.processes[0].kill()
    kept = {}
    for path in [two / "records.jsonl", *part_paths(two / "records.jsonl")]:
        for line in path.read_text().splitlines() if path.exists() else []:
            record = json.loads(line)
            kept[record["lambda"], record["id"]] = record["wall_s"]
    assert 2 <= len(kept) < len(answers(one))
    with Job([*SWEEP, "--out", str(two)]) as job:
        (code0, _, err0), (code1, _, err1) = job.wait()
    assert code0 == 0 and code1 == 0, (err0[-2000:], err1[-2000:])
    assert answers(two) == answers(one)
    final = {(r["lambda"], r["id"]): r["wall_s"] for r in map(json.loads, (two / "records.jsonl").read_text().splitlines())}
    assert {k: final[k] for k in kept} == kept  # what was kept was not answered again
    assert len(final) == len(answers(one))


def _chat(url: str, i: int, **extra) -> httpx.Response:
    body = {"model": "dami-toy", "messages": [{"role": "user", "content": QUESTIONS[i]}], "max_tokens": 80, "temperature": 0,
            "lambda": LAMBDAS[i], **extra}  # fmt: skip
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


@pytest.mark.slow
@pytest.mark.usefixtures("highest_precision")
@pytest.mark.parametrize("cache", ["dense", "tailorkv-1"])
def test_a_server_over_two_processes_answers_as_generate_does_alone(cache):
    port = free_port()
    with Job(["serve", "--host", HOST, "--port", str(port), "--slots", "4", "--max-len", "512", "--cache", cache]) as job:
        leader = job.processes[0]
        deadline, ready = time.monotonic() + DEADLINE_S, ""
        while time.monotonic() < deadline and leader.poll() is None and "serving" not in ready:
            ready = leader.stdout.readline()
        assert "over 2 processes and 4 devices" in ready, leader.stderr.read() if leader.poll() is not None else "timeout"
        url = f"http://{HOST}:{port}"
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda i: _chat(url, i), range(8)))
        refused = _chat(url, 0, logprobs=True)
        leader.send_signal(signal.SIGTERM)
        (code0, _, _), (code1, _, err1) = job.wait()
    pair = dj.load_toy_pair()
    for i, response in enumerate(responses):
        prompt = chat_tokens(pair.tokenizers["thinking"], QUESTIONS[i])
        theta = dj.interpolate(pair.instruct, pair.thinking, LAMBDAS[i])
        row = dj.generate(theta, pair.cfg, [prompt], max_new_tokens=80, cache=pair_cache_config(cache, pair)).token_lists()[0]
        assert response.json()["choices"][0]["message"]["content"] == pair.tokenizers["thinking"].decode(row, skip_special_tokens=True)
    assert refused.status_code == 400 and "spans several processes" in refused.json()["error"]["message"]
    assert code0 == 0 and code1 == 0, err1[-2000:]
    assert "process 0 stopped" in err1


SPMD = textwrap.dedent("""
    import dataclasses, json, sys
    import jax
    from dami_jax.distributed import initialize
    flags = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    initialize(flags["--coordinator"], int(flags["--num-processes"]), int(flags["--process-id"]))
    import dami_jax as dj
    from dami_jax.evals.prompts import prompt_tokens
    from dami_jax.toy.evaluation import toy_problems
    from dami_jax.toy.pair import toy_pair_paths
    devices, cache = json.loads(flags["--case"])  # which devices: every one, or one of each process
    pair = dj.load_pair(*toy_pair_paths(), mesh=dj.make_mesh(jax.devices()[::devices]))
    prompts = [prompt_tokens(pair.tokenizers["thinking"], p, "toy") for p in toy_problems(2, seed=5)][:10]
    cache = dataclasses.replace(dj.TAILORKV_1, group=32) if cache == "tailorkv" else dj.DenseCacheConfig()
    out = dj.serve(pair, prompts, [i / 9 for i in range(10)], max_new_tokens=24, slots=4, cache=cache)
    print(json.dumps(out.token_lists()))
""")


@pytest.mark.slow
@pytest.mark.usefixtures("highest_precision")
@pytest.mark.parametrize(
    "devices, cache", [(1, "dense"), (2, "tailorkv")], ids=["dense-all-4-devices", "tailorkv-heads-split-over-processes"]
)
def test_every_process_calling_dj_serve_gives_the_single_process_tokens(devices, cache):
    """Dense on all 4 devices; TailorKV on one device of each process, so that each process holds
    one of the 2 KV heads, its prompt stores in that process's host memory."""
    with Job([SPMD, "--case", json.dumps([devices, cache])], cli=False) as job:
        (code0, out0, err0), (code1, out1, _) = job.wait()
    assert code0 == 0 and code1 == 0, err0[-2000:]
    pair = dj.load_toy_pair()
    prompts = [prompt_tokens(pair.tokenizers["thinking"], p, "toy") for p in toy_problems(2, seed=5)][:10]
    config = dataclasses.replace(dj.TAILORKV_1, group=32) if cache == "tailorkv" else dj.DenseCacheConfig()
    alone = dj.serve(pair, prompts, [i / 9 for i in range(10)], max_new_tokens=24, slots=4, cache=config).token_lists()
    assert json.loads(out0.splitlines()[-1]) == alone == json.loads(out1.splitlines()[-1])
