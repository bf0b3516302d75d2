"""The engine with a TailorKV cache (every slot a TailorKV row), on the peaked model (``peaked.py``),
whose greedy answer walks a linked list hidden far back in the prompt only if every layer finds
the right tokens at every step: a stream of long and short prompts with mixed lambdas and budgets
through 4 slots, each result against ``dj.generate`` alone on theta(lambda) with the same cache;
a request inserted while others decode; bad configurations refused before any slot is taken."""

from __future__ import annotations

import re
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from peaked import CFG, DEFAULT, linked_prompt, peaked_model, walk

import dami_jax as dj
from dami_jax.dami.pair import ModelPair
from dami_jax.decoding.cache import cache_bytes
from dami_jax.engine.engine import Engine
from dami_jax.errors import InputError
from dami_jax.tailorkv.cache import TailorKVConfig

pytestmark = pytest.mark.usefixtures("highest_precision")

# Two peaked models that differ in their fillers' features: every theta(lambda) between them
# follows the same links, so every request has one right answer, whatever its lambda.
PAIR = ModelPair(CFG, peaked_model(0), peaked_model(1), {}, {})
LENGTHS = (200, 400, 1100, 1500)  # past TailorKV-1's budget (192) all; past TailorKV-2's (1024) the last two
LAMBDAS = (0.0, 0.3, 0.5, 1.0)
BUDGETS = (6, 24)
LINKS = dict(links_from=80, links_before_end=80)  # outside both presets' sink (8, 64) and recent (56, 64) windows
MAX_LEN = 1536


def request(i: int, rng: np.random.Generator) -> dict:
    successor = rng.permutation(4)
    while np.any(successor == np.arange(4)):  # a cycle that never stays on a node
        successor = rng.permutation(4)
    start = int(rng.integers(4))
    prompt = linked_prompt(int(rng.choice(LENGTHS)), successor.tolist(), start, seed=100 + i, **LINKS)
    budget = int(rng.choice(BUDGETS))
    return dict(prompt=prompt, lam=float(rng.choice(LAMBDAS)), max_new_tokens=budget, answer=walk(successor.tolist(), start, budget))


STREAM = [request(i, np.random.default_rng(i)) for i in range(30)]


def alone(r: dict, cache) -> list[int]:
    theta = dj.interpolate(PAIR.instruct, PAIR.thinking, r["lam"])
    return dj.generate(theta, CFG, [r["prompt"]], max_new_tokens=r["max_new_tokens"], stop_tokens=[], cache=cache).token_lists()[0]


@pytest.mark.slow
@pytest.mark.parametrize("preset", [dj.TAILORKV_1, dj.TAILORKV_2], ids=["TailorKV-1", "TailorKV-2"])
def test_a_stream_through_four_tailorkv_slots_equals_each_prompt_alone(preset):
    assert {len(r["prompt"]) for r in STREAM} == set(LENGTHS) and len({r["lam"] for r in STREAM}) == len(LAMBDAS)
    engine = Engine(PAIR, slots=4, max_len=MAX_LEN, max_new_tokens=max(BUDGETS), cache=preset)
    ids = [engine.submit(r["prompt"], lam=r["lam"], max_new_tokens=r["max_new_tokens"], stop_tokens=[]) for r in STREAM]
    results = engine.run()
    assert [r.id for r in results] == ids
    assert engine.stats.mixed_steps > 0 and engine.stats.prefill_calls > len(STREAM)  # mixed lambdas; prompts in pieces
    for r, result in zip(STREAM, results):
        assert result.tokens == r["answer"]  # the links were found, every step
        assert result.tokens == alone(r, preset)


def test_a_request_inserted_while_others_decode_leaves_their_tokens_alone():
    first, second, late = STREAM[2], STREAM[5], STREAM[9]
    engine = Engine(PAIR, slots=4, max_len=MAX_LEN, max_new_tokens=64, cache=dj.TAILORKV_1)
    early = [engine.submit(r["prompt"], lam=r["lam"], max_new_tokens=40, stop_tokens=[]) for r in (first, second)]
    seen = {i: [] for i in early}
    while min(len(tokens) for tokens in seen.values()) < 8:  # both decoding
        for event in engine.step():
            seen[event.id] += event.tokens
    late_id = engine.submit(late["prompt"], lam=late["lam"], max_new_tokens=late["max_new_tokens"], stop_tokens=[])
    results = {r.id: r.tokens for r in engine.results()}
    for i, r in zip(early, (first, second)):
        assert results[i] == alone(dict(r, max_new_tokens=40), dj.TAILORKV_1)
    assert results[late_id] == late["answer"]


def test_device_kv_per_slot_shrinks_and_the_prompts_sit_in_host_memory():
    dense = Engine(PAIR, slots=2, max_len=MAX_LEN, max_new_tokens=32)
    tailorkv = Engine(PAIR, slots=2, max_len=MAX_LEN, max_new_tokens=32, cache=dj.TAILORKV_1)
    (dense_device, dense_host), (device, host) = (cache_bytes(e.runtime.state.cache) for e in (dense, tailorkv))
    assert dense_host == 0 and host > dense_device and device * 10 < dense_device
    assert tailorkv.sizing.kv_bytes == device and tailorkv.sizing.host_bytes == host  # what sizing counted is what was built
    store = tailorkv.runtime.state.cache.inner.prompts[1]
    assert store.k.sharding.memory_kind == "pinned_host"


def test_tailorkv_slots_on_a_mesh_give_the_one_device_tokens_each_device_holding_its_heads():
    """2 virtual devices split the 2 KV heads: every per-head array of a slot, the prompt stores
    included, which stay in host memory, one head beside each device."""
    rows = [r for r in STREAM if len(r["prompt"]) > dj.TAILORKV_1.budget][:8]  # every row past the budget: top-k decides
    engines = [Engine(PAIR, slots=2, max_len=MAX_LEN, max_new_tokens=max(BUDGETS), cache=dj.TAILORKV_1, mesh=mesh)
               for mesh in (None, dj.make_mesh(jax.devices()[:2]))]  # fmt: skip
    tokens = []
    for engine in engines:
        for r in rows:
            engine.submit(r["prompt"], lam=r["lam"], max_new_tokens=r["max_new_tokens"], stop_tokens=[])
        tokens.append([result.tokens for result in engine.run()])
    assert tokens[1] == tokens[0] == [r["answer"] for r in rows]
    cache = engines[1].runtime.state.cache.inner
    for leaf in (cache.prompts[1].k, cache.prompts[1].kt, cache.prompts[0].v, cache.layers[0].keys.codes, cache.layers[1].k_gen):
        assert leaf.sharding.spec == P(None, "tp") and {s.data.shape[1] for s in leaf.addressable_shards} == {1}
    assert {s.data.sharding.memory_kind for s in cache.prompts[1].k.addressable_shards} == {"pinned_host"}
    assert cache.layers[1].k_gen.sharding.memory_kind == "device" and cache.length.sharding.spec == P()
    # Each device estimates, selects and fetches its own heads' tokens: the decode step's only
    # collectives are tensor parallelism's all-reduces of [rows, 1, hidden] activations.
    runtime = engines[1].runtime
    text = runtime.decode_step.lower(runtime.pair.instruct, None, runtime.state, np.zeros(runtime.slots, bool), np.int32(0),
                                     cfg=CFG, rows=runtime.slots, max_steps=runtime.steps_per_call).compile().as_text()  # fmt: skip
    collectives = re.findall(r"= (\w+\[[\d,]*\])\S* (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)\(", text)
    assert collectives and set(collectives) == {(f"f32[{runtime.slots},1,{CFG.hidden_size}]", "all-reduce")}


def test_serve_takes_a_tailorkv_cache():
    rows = STREAM[:3]
    out = dj.serve(PAIR, [r["prompt"] for r in rows], [r["lam"] for r in rows], max_new_tokens=[r["max_new_tokens"] for r in rows],
                   stop_tokens=[], cache=dj.TAILORKV_1, slots=2)  # fmt: skip
    assert out.token_lists() == [r["answer"] for r in rows]


def test_without_the_links_the_answer_is_the_default():  # the stream's check can fail
    r = STREAM[0]
    prompt = linked_prompt(len(r["prompt"]), [1, 2, 3, 0], 0, seed=1, links=False, **LINKS)
    engine = Engine(PAIR, slots=1, max_len=MAX_LEN, max_new_tokens=8, cache=dj.TAILORKV_1)
    engine.submit(prompt, max_new_tokens=4, stop_tokens=[])
    assert engine.run()[0].tokens == [DEFAULT] * 4


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(cache=TailorKVConfig(quantized_layers=(5,))), r"cache: quantized_layers: \[5\] outside the model's 3 layers"),
        (dict(cache=TailorKVConfig(num_channels=65)), "cache: num_channels=65 exceeds head_dim=64"),
        (dict(cache=dj.TAILORKV_2, max_len=500), r"cache: TailorKV's top-k of 896 tokens is more than a slot's prompt store holds \(512 tokens"),
        (dict(cache=dj.TAILORKV_1, max_len=512, max_new_tokens=512), "max_new_tokens: 512 leaves no room for a prompt"),
        (dict(cache="tailorkv-1"), "cache: the engine takes dj.DenseCacheConfig"),
    ],
)
def test_bad_configurations_are_refused_before_any_slot_is_taken(options, message):
    with pytest.raises(InputError, match=message):
        Engine(PAIR, slots=2, **{"max_len": MAX_LEN, **options})


def test_a_request_past_the_generated_tokens_store_is_refused_alone():
    engine = Engine(PAIR, slots=2, max_len=MAX_LEN, max_new_tokens=16, cache=dj.TAILORKV_1)
    with pytest.raises(InputError, match="max_new_tokens: 17 is more than the engine's max_new_tokens=16"):
        engine.submit(STREAM[0]["prompt"], max_new_tokens=17)
    assert engine.idle and jax.tree.leaves(engine.runtime.state.cache)


@pytest.mark.slow
def test_no_compilation_after_warmup_on_tailorkv_slots():
    engine = Engine(PAIR, slots=4, max_len=MAX_LEN, max_new_tokens=max(BUDGETS), cache=dj.TAILORKV_1)
    engine.warmup()
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **_: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
    )
    rows = STREAM[:10]
    for r in rows:
        engine.submit(r["prompt"], lam=r["lam"], max_new_tokens=r["max_new_tokens"], stop_tokens=[])
    assert [result.tokens for result in engine.run()] == [r["answer"] for r in rows]
    assert engine.stats.mixed_steps > 0 and compiles == []
