"""Scripts that run outside the suite: the one-shot GPU check's dry run (every step's script and
flag exists, and a missing one is named) and the kernel benchmark on CPU at a tiny size."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("pytest", "bench_kernels", "bench_tailorkv", "bench_interpolate", "bench_decode")


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=ROOT, capture_output=True, text=True)


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_gpu_check_dry_run_lists_every_step():
    done = run("bash", "scripts/gpu_check.sh", "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    for step in STEPS:
        assert re.search(rf"^  {step} +\d+s  ", done.stdout, re.M), (step, done.stdout)
    assert "-m gpu" in done.stdout and "tests/kernels/test_gpu.py" in done.stdout
    assert "bench_decode.py --dtype bfloat16" in done.stdout and "bench_tailorkv.py --dtype bfloat16" in done.stdout
    assert "checked: every script and flag exists" in done.stdout


def test_gpu_check_dry_run_names_a_missing_flag(tmp_path):
    """A copy of the repository whose bench_decode.py lost ``--dtype`` fails the dry run, naming it."""
    for part in ("scripts", "tests/kernels"):
        shutil.copytree(ROOT / part, tmp_path / part)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    script = tmp_path / "scripts" / "bench_decode.py"
    script.write_text(script.read_text().replace('"--dtype"', '"--precision"'))
    done = subprocess.run(["bash", str(tmp_path / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True)
    assert done.returncode == 1
    assert "MISSING: scripts/bench_decode.py has no option --dtype" in done.stdout
    assert "scripts/bench_tailorkv.py has no option" not in done.stdout


def test_gpu_check_refuses_unknown_arguments():
    done = run("bash", "scripts/gpu_check.sh", "--bogus")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "unknown argument --bogus" in done.stderr


def test_llama_weight_bytes_match_its_published_size():
    """8,030,261,248 parameters (Llama-3.1-8B's safetensors); a step reads all but the embedding
    table, of which it reads one row."""
    module = script("bench_kernels")
    assert module.weight_bytes(module.LLAMA_3_1_8B, 2) == 2 * (8_030_261_248 - 128_255 * 4096)


def test_bench_kernels_on_cpu():
    """The XLA paths only, a 256-token context, batch 2; a 1024-slot cache with 100 live tokens a
    row against full rows; the projection adds up as printed."""
    done = run(sys.executable, "scripts/bench_kernels.py", "--contexts", "256", "--batch", "2", "--repeats", "1",
               "--capacity", "1024", "--live", "100")  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "only the XLA paths are timed" in out and "interpreters, whose speed means nothing" in out
    rows = re.findall(r"^ +256 +2  (.+?) +(\d+\.\d+) +(\d+\.\d+)$", out, re.M)
    assert [name for name, _, _ in rows] == [
        "dense attention, XLA", "quantized attention, XLA reference", "dense layer step, XLA",
        "quantized layer step, xla", "sparse layer step, xla",
    ]  # fmt: skip
    assert float(rows[0][2]) == 1.0
    assert "per-slot cache of 1024 slots, every row live up to 100 tokens (XLA's window: 128 slots)" in out
    live = re.findall(r"^ +2  (.+?) +(\d+\.\d+) +(\d+\.\d+) +(\d+\.\d+) +(\d+\.\d+)$", out, re.M)
    assert [name for name, *_ in live] == ["XLA, whole cache masked", "XLA, window of the longest row's bucket"]
    for _, at_live, full, live_over_full, _ in live:
        assert abs(float(at_live) / float(full) - float(live_over_full)) <= 0.01 * float(live_over_full) + 1e-3
    assert float(live[0][4]) == 1.0
    formula = re.search(
        r"1 x quantized step \+ 31 x sparse step \+ weights / bandwidth = 1 x ([\d.]+) \+ 31 x ([\d.]+) \+ "
        r"([\d.]+) GB / ([\d.]+) GB/s = ([\d.]+) ms",
        out,
    )
    assert formula, out
    quant, sparse, gigabytes, bandwidth, total = map(float, formula.groups())
    assert (quant, sparse) == (float(rows[3][1]), float(rows[4][1]))
    assert abs(quant + 31 * sparse + gigabytes / bandwidth * 1e3 - total) <= 0.01 * total
    assert "goals (stated at 32768 tokens): not measured in this run" in out


def test_bench_kernels_checks_its_arguments():
    done = run(sys.executable, "scripts/bench_kernels.py", "--contexts", "100")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "multiple of 64" in done.stderr
    done = run(sys.executable, "scripts/bench_kernels.py", "--capacity", "512", "--live", "600")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "--live 600 must be in [1, --capacity 512]" in done.stderr


def test_bench_http_budgets_are_heavy_tailed_and_bounded():
    module = script("bench_http")
    budgets = module.heavy_tailed_budgets(2000, seed=0, low=8, high=256)
    assert budgets == module.heavy_tailed_budgets(2000, seed=0, low=8, high=256)
    assert min(budgets) == 8 and max(budgets) == 256
    assert 30 <= np.median(budgets) <= 42 and np.percentile(budgets, 99) > 4 * np.median(budgets)


def test_bench_http_bans_the_end_of_turn_on_both_servers():
    """Both servers then generate exactly max_tokens, so their token counts are the same."""
    module = script("bench_http")
    request = module.Request("What is 2+2?", 17)
    ours, theirs = module.body("ours", "m", request), module.body("llama", "m", request)
    assert ours["ignore_eos"] is True and theirs["logit_bias"] == {str(module.END_OF_TURN): -100.0}
    assert theirs["cache_prompt"] is False  # llama-server's prompt cache off: we keep none either
    for body in (ours, theirs):
        assert body["max_tokens"] == 17 and body["temperature"] == 0.0 and body["stream"] is True
        assert body["messages"][0]["content"].startswith("What is 2+2?") and "\\boxed{}" in body["messages"][0]["content"]


def test_bench_engine_kv_counts_what_tailorkv_keeps_off_the_device():
    done = run(sys.executable, "scripts/bench_engine_kv.py", "--max-new-tokens", "64")
    assert done.returncode == 0, done.stderr
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines()[2:]]  # after the header and its rule
    assert len(rows) == 12  # 2 models x 2 contexts x 3 caches
    for model, context, cache, device, host, ratio in ([c.strip() for c in row] for row in rows):
        if cache == "dense":
            assert host == "0" and ratio == "1.0x"
        else:
            assert float(ratio.split("x")[0]) > 10 and float(host) > float(device)
