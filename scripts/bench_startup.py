"""How long ``dami-jax serve`` takes from its start to its ready line and to its first answer.

Each checkout in ``--roots`` is started as a user starts it (``python -m dami_jax.cli serve
--pair smollm2`` with that checkout first on ``PYTHONPATH``, its defaults otherwise), then asked
one greedy chat question twice: the first answer includes whatever the server left to compile,
the second is the steady state. ``--cold`` moves XLA's persistent cache (``$DAMI_JAX_CACHE/xla``)
aside first, so that the first start compiles everything; a second start of the same root then
shows what the cache saves. Run it on an otherwise idle machine::

    python scripts/bench_startup.py --roots /path/to/old-checkout . . --cold
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from dami_jax.models.assets import cache_dir

QUESTION = "What is 12 + 30?"
MAX_TOKENS = 32


def ask(port: int, model: str) -> tuple[float, dict]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": MAX_TOKENS,
                       "temperature": 0}).encode()  # fmt: skip
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body, {"Content-Type": "application/json"})
    started = time.perf_counter()
    answer = json.loads(urllib.request.urlopen(request, timeout=900).read())
    return time.perf_counter() - started, answer["usage"]


def start(root: Path, pair: str, port: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root)}
    argv = [sys.executable, "-m", "dami_jax.cli", "serve", "--pair", pair, "--port", str(port)]
    started = time.perf_counter()
    server = subprocess.Popen(argv, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in server.stdout:
            if "serving" in line:
                break
        else:
            raise RuntimeError(f"{root}: serve exited with {server.wait()} before it was ready")
        ready = time.perf_counter() - started
        first, usage = ask(port, f"dami-{pair}")
        again, _ = ask(port, f"dami-{pair}")
        return {"root": str(root), "ready_s": ready, "first_answer_s": ready + first, "again_s": again,
                "usage": usage, "ready_line": line.strip()}  # fmt: skip
    finally:
        server.terminate()
        server.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roots", nargs="+", type=Path, default=[Path(".")], help="checkouts to start, in order")
    parser.add_argument("--pair", default="smollm2")
    parser.add_argument("--port", type=int, default=8741)
    parser.add_argument("--cold", action="store_true", help="move XLA's persistent cache aside before the first start")
    args = parser.parse_args()
    missing = [str(root) for root in args.roots if not (root / "dami_jax").is_dir()]
    if missing:
        parser.error(f"--roots: not a dami-jax checkout: {', '.join(missing)}")
    if args.cold and (cache_dir() / "xla").exists():
        aside = cache_dir() / f"xla.aside-{int(time.time())}"
        (cache_dir() / "xla").rename(aside)
        print(f"XLA cache moved to {aside}", flush=True)
    for root in args.roots:
        print(json.dumps(start(root.resolve(), args.pair, args.port)), flush=True)


if __name__ == "__main__":
    main()
