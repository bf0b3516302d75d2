"""The engine on a device mesh (4 virtual CPU devices): a stream of mixed-lambda requests gives the
single-device tokens, with the KV cache split over KV heads where the mesh divides them, the
steps compiled once per shape as on one device, and none after warm-up; a Qwen3-MoE pair with its
experts split over the devices; ``dj.serve`` on a mesh; what a mesh cannot take yet is refused."""

from __future__ import annotations

import logging
from collections import Counter

import jax
import numpy as np
import pytest
from conftest import write_tiny_pair
from jax.sharding import PartitionSpec as P

import dami_jax as dj
from dami_jax.engine.engine import Engine
from dami_jax.errors import InputError
from dami_jax.evals.prompts import prompt_tokens
from dami_jax.toy.evaluation import toy_problems

pytestmark = pytest.mark.usefixtures("highest_precision")

LAMBDAS = (0.0, 1.0, 0.3, 0.5, 0.8)


@pytest.fixture(scope="module")
def pair():
    return dj.load_toy_pair()


def stream(pair, count: int = 14) -> list[tuple[list[int], float, int]]:
    prompts = [prompt_tokens(pair.tokenizers["thinking"], p, "toy") for p in toy_problems(3, seed=7)][:count]
    return [(p, LAMBDAS[i % len(LAMBDAS)], (8, 24, 40)[i % 3]) for i, p in enumerate(prompts)]


class CompileLog(logging.Handler):
    """The names of the functions jax compiles while it is attached (``jax.log_compiles``)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Compiling jit("):  # "Compiling jit(decode_call) with global shapes ..."
            self.names.append(message.split()[1][4:-1])

    def __enter__(self) -> "CompileLog":
        jax.clear_caches()  # so that what an earlier engine compiled counts again
        logging.getLogger("jax").addHandler(self)
        return self

    def __exit__(self, *_) -> None:
        logging.getLogger("jax").removeHandler(self)


def run(pair, requests, **options) -> tuple[list[list[int]], Engine, Counter, list[str]]:
    """Every request through a 4-slot engine: (tokens per request in order, the engine, the step
    functions compiled in its warm-up, everything compiled after it)."""
    engine = Engine(pair, slots=4, max_len=192, prefill_chunk=64, **options)
    with CompileLog() as log, jax.log_compiles():
        engine.warmup()
        warm = len(log.names)
        for prompt, lam, budget in requests:
            engine.submit(prompt, lam=lam, max_new_tokens=budget)
        results = sorted(engine.run(), key=lambda r: r.id)
    steps = Counter(name for name in log.names[:warm] if name in ("prefill_call", "decode_call"))
    return [list(r.tokens) for r in results], engine, steps, log.names[warm:]


@pytest.mark.parametrize("devices", [2, 4])
def test_a_mixed_lambda_stream_on_a_mesh_gives_the_single_device_tokens(pair, devices):
    """2 devices split the toy's 2 KV heads; 4 cannot, and replicate them."""
    requests = stream(pair)
    alone, _, alone_steps, _ = run(pair, requests)
    tokens, engine, steps, after = run(pair, requests, mesh=dj.make_mesh(jax.devices()[:devices]))
    assert tokens == alone
    assert after == []  # nothing compiled after warm-up
    scheduler = engine.scheduler
    # As on one device: decode plain and mixed per rows bucket, prefill per packed width and for later pieces.
    assert steps == alone_steps == {"decode_call": 2 * len(scheduler.row_buckets), "prefill_call": len(scheduler.pack_widths) + 1}
    k = engine.runtime.state.cache.k[0]
    assert k.sharding.spec == (P(None, "tp") if devices == 2 else P()) and len(k.sharding.device_set) == devices
    assert engine.pair.instruct["layers"][0]["attn"]["q"].sharding.spec == P(None, "tp")


def test_a_mixture_of_experts_pair_on_a_mesh_splits_its_experts(tmp_path_factory):
    moe = dj.load_pair(*write_tiny_pair(tmp_path_factory, moe=True))
    requests = stream(moe, 8)
    alone, _, alone_steps, _ = run(moe, requests)
    tokens, engine, steps, after = run(moe, requests, mesh=dj.make_mesh())
    assert tokens == alone and steps == alone_steps and after == []
    experts = engine.pair.thinking["layers"][1]["mlp"]["experts"]["gate"]
    assert experts.sharding.spec == P("tp", None, None) and experts.addressable_shards[0].data.shape[0] == 1  # 4 experts, one per device


def test_serve_on_a_mesh_and_what_a_mesh_refuses(pair):
    requests = stream(pair, 6)
    prompts, lambdas, _ = zip(*requests)
    one = dj.serve(pair, prompts, lambdas, max_new_tokens=16, slots=3)
    meshed = dj.serve(pair, prompts, lambdas, max_new_tokens=16, slots=3, mesh=dj.make_mesh())
    np.testing.assert_array_equal(meshed.tokens, one.tokens)
    bad = jax.make_mesh((4,), ("data",))
    with pytest.raises(InputError, match="needs an axis named 'tp'"):
        Engine(pair, slots=2, max_len=128, mesh=bad)
