"""The engine: streams of requests through few slots, each result against ``dj.generate`` on
theta(lambda) for that prompt alone (greedy and sampled), validation that refuses before a slot is
taken, streaming, cancellation, chunked prefill between decode steps, decode steps that read only
live tokens, no compilation after warm-up, and in-place cache updates."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dami_jax as dj
from dami_jax.dami.serving import serve_static
from dami_jax.decoding.sampling import sample_rows, sample_tokens
from dami_jax.engine.cache import RowLayout, SlotKVCache
from dami_jax.engine.engine import Engine
from dami_jax.engine.steps import Pack, Piece, SlotState, Starts, decode, prefill
from dami_jax.errors import InputError
from dami_jax.evals.plots import plot_occupancy
from dami_jax.evals.prompts import prompt_tokens
from dami_jax.models.config import ModelConfig
from dami_jax.toy.evaluation import toy_problems

pytestmark = pytest.mark.usefixtures("highest_precision")

LAMBDAS = (0.0, 1.0, 0.3, 0.5, 0.8)
BUDGETS = (6, 24, 80)  # 80 lets the thinking answers finish on their own; 6 and 24 cut most
SMALL_BLOCKS = RowLayout(window=32, block=32)  # rows read in several blocks, as long rows are on real models


@pytest.fixture(scope="module")
def pair():
    return dj.load_toy_pair()


@pytest.fixture(scope="module")
def stream(pair):
    """42 requests: prompts of levels 1-6, lambdas and budgets mixed (seeded)."""
    tokenizer = pair.tokenizers["thinking"]
    prompts = [prompt_tokens(tokenizer, p, "toy") for p in toy_problems(7, seed=5)][:42]
    rng = np.random.default_rng(0)
    return [(p, float(rng.choice(LAMBDAS)), int(rng.choice(BUDGETS))) for p in prompts]


def alone(pair, prompt, lam, max_new_tokens, **options):
    """The reference: ``prompt`` generated on its own on the materialized theta(lam)."""
    theta = dj.interpolate(pair.instruct, pair.thinking, lam)
    return dj.generate(theta, pair.cfg, [prompt], max_new_tokens=max_new_tokens, **options)


@pytest.fixture(scope="module")
def expected(pair, stream):
    return [alone(pair, p, lam, n).token_lists()[0] for p, lam, n in stream]


def test_a_stream_through_four_slots_equals_each_prompt_alone(pair, stream, expected, tmp_path):
    engine = Engine(pair, slots=4, max_len=192, layout=SMALL_BLOCKS)
    ids = [engine.submit(p, lam=lam, max_new_tokens=n) for p, lam, n in stream]
    results = engine.run()
    assert [r.id for r in results] == ids
    assert [r.tokens for r in results] == expected
    assert {r.finish_reason for r in results} == {"stop", "length"}  # some stopped, some ran out
    assert all(len(r.tokens) == n for r, (_, _, n) in zip(results, stream) if r.finish_reason == "length")
    assert all(len(r.logprobs) == len(r.tokens) and r.time_to_first_token > 0 for r in results)
    stats = engine.stats
    assert 0 < stats.mixed_steps < stats.decode_steps  # both the mixed and the single-theta path ran
    assert stats.emitted_tokens == sum(len(r.tokens) - 1 for r in results)  # the first token comes from prefill
    assert stats.occupancy > 0.5
    assert sum(steps for _, _, steps in stats.timeline) == stats.decode_steps
    assert plot_occupancy({"4 slots": (stats.timeline, 4)}, tmp_path / "occupancy.png").stat().st_size > 0
    reference = alone(pair, stream[0][0], stream[0][1], stream[0][2])
    np.testing.assert_allclose(results[0].logprobs, np.asarray(reference.logprobs)[0, : len(results[0].tokens)], atol=1e-4)


@pytest.mark.parametrize(
    "options", [dict(steps_per_call=1), dict(steps_per_call=8, admission="group"), dict(theta_cache=0, admission="lambda")]
)
def test_engine_settings_change_the_schedule_not_the_tokens(pair, stream, expected, options):
    engine = Engine(pair, slots=3, max_len=192, **options)
    for p, lam, n in stream[:15]:
        engine.submit(p, lam=lam, max_new_tokens=n)
    assert [r.tokens for r in engine.run()] == expected[:15]


def test_sampled_requests_follow_their_own_keys_whatever_the_order(pair, stream):
    settings = [dj.Sampling(temperature=1.0), dj.Sampling(temperature=0.7, top_k=12), dj.Sampling(temperature=1.3, top_p=0.8),
                dj.Sampling(temperature=1.0, top_k=20, top_p=0.9), dj.GREEDY]  # fmt: skip
    requests = [(p, lam, 24, settings[i % len(settings)], jax.random.key(100 + i)) for i, (p, lam, _) in enumerate(stream[:20])]
    reference = [alone(pair, p, lam, n, sampling=s, key=k[None], stop_tokens=[]).token_lists()[0] for p, lam, n, s, k in requests]

    def served(order):
        engine = Engine(pair, slots=4, max_len=160)
        ids = {engine.submit(requests[i][0], lam=requests[i][1], max_new_tokens=24, sampling=requests[i][3], key=requests[i][4],
                             stop_tokens=[]): i for i in order}  # fmt: skip
        return {ids[r.id]: r.tokens for r in engine.results()}

    forward = served(range(20))
    assert [forward[i] for i in range(20)] == reference
    assert served(np.random.default_rng(1).permutation(20).tolist()) == forward
    assert len({tuple(t) for t in reference}) == 20  # the keys matter


def test_bad_requests_are_refused_before_taking_a_slot(pair, stream, expected):
    engine = Engine(pair, slots=2, max_len=128)
    prompt = stream[0][0]
    bad = [
        (dict(prompt=[]), "prompt: needs at least one token"),
        (dict(prompt=[1, 2, 999]), "token id 999 is outside the vocabulary"),
        (dict(prompt="abc"), "prompt: must be a sequence of token ids"),
        (dict(max_new_tokens=128), "exceed the engine's context of 128 tokens"),
        (dict(max_new_tokens=0), "max_new_tokens: must be an integer >= 1"),
        (dict(lam=1.5), "lam: 1.5 is outside"),
        (dict(lam=float("nan")), "not finite"),
        (dict(sampling=dj.Sampling(temperature=1.0)), "needs an explicit PRNG key"),
        (dict(key=jax.random.split(jax.random.key(0), 2)), "key: need one PRNG key"),
        (dict(stop_tokens=list(range(9))), "more than the engine's max_stop_tokens=8"),
    ]
    good = []
    for i, (kwargs, message) in enumerate(bad):
        p, lam, n = stream[i]
        good.append(engine.submit(p, lam=lam, max_new_tokens=n))
        with pytest.raises(InputError, match=re.escape(message)):
            engine.submit(**{"prompt": prompt, "lam": 0.5, "max_new_tokens": 8, **kwargs})
    assert engine.waiting == len(bad) and engine.busy_slots == 0
    results = engine.run()
    assert [r.id for r in results] == good
    assert [r.tokens for r in results] == expected[: len(bad)]


def test_bad_engine_settings_are_refused_naming_them(pair):
    with pytest.raises(InputError, match="slots: must be an integer >= 1"):
        Engine(pair, slots=0)
    with pytest.raises(InputError, match="prefill_chunk: must be a power of two, got 40"):
        Engine(pair, prefill_chunk=40)
    with pytest.raises(InputError, match="max_len: must be an integer >= 2, got 1"):
        Engine(pair, max_len=1)
    with pytest.raises(InputError, match="kernel: kernel must be one of"):
        Engine(pair, kernel="cuda")


def test_streamed_tokens_add_up_to_the_results(pair, stream, expected):
    engine = Engine(pair, slots=3, max_len=192)
    ids = [engine.submit(p, lam=lam, max_new_tokens=n) for p, lam, n in stream[:9]]
    pieces: dict[int, list[int]] = {i: [] for i in ids}
    finished = {}
    for event in engine.stream():
        assert event.id not in finished  # nothing comes after a request's result
        pieces[event.id] += event.tokens
        if event.result is not None:
            finished[event.id] = event.result
    assert [pieces[i] for i in ids] == [finished[i].tokens for i in ids] == expected[:9]


def test_cancel_frees_the_slot_and_leaves_the_others_alone(pair, stream, expected):
    engine = Engine(pair, slots=2, max_len=192, steps_per_call=1)
    long_one = engine.submit(stream[0][0], lam=1.0, max_new_tokens=80, stop_tokens=[])
    ids = [engine.submit(p, lam=lam, max_new_tokens=n) for p, lam, n in stream[1:6]]
    seen = []
    while len(seen) < 5:  # the long request has produced a few tokens
        seen += [t for e in engine.step() if e.id == long_one for t in e.tokens]
    cancelled = engine.cancel(long_one)
    assert cancelled.finish_reason == "cancelled" and cancelled.tokens == seen
    assert engine.cancel(long_one) is None  # gone
    waiting = engine.cancel(ids[-1])  # still queued: never started
    assert waiting.tokens == [] and waiting.first_token is None
    results = engine.run()
    assert [r.tokens for r in results] == expected[1:5]


def test_a_long_prompt_is_prefilled_in_pieces_between_decode_steps(pair, stream):
    tokenizer = pair.tokenizers["thinking"]
    long_problem = toy_problems(1, seed=9)[-1]
    filler = tokenizer.encode(" a=1, b=a+1." * 12, add_special_tokens=False)
    long_prompt = filler + prompt_tokens(tokenizer, long_problem, "toy")
    assert len(long_prompt) > 200
    engine = Engine(pair, slots=2, max_len=320, prefill_chunk=64, steps_per_call=1, layout=SMALL_BLOCKS)
    short = engine.submit(stream[0][0], lam=0.0, max_new_tokens=40, stop_tokens=[])
    assert engine.step() == []  # dispatched; its tokens come back with the next step
    late = engine.submit(long_prompt, lam=0.5, max_new_tokens=24)
    pieces = -(-len(long_prompt) // 64)
    while_prefilling = [{e.id for e in engine.step()} for _ in range(pieces)]  # each step dispatches one piece
    assert all(ids == {short} for ids in while_prefilling)  # the short one got a token every step meanwhile
    assert late in {e.id for e in engine.step()}  # the last piece's first token
    results = {r.id: r.tokens for r in engine.results()}
    assert results[late] == alone(pair, long_prompt, 0.5, 24).token_lists()[0]
    assert results[short] == alone(pair, stream[0][0], 0.0, 40, stop_tokens=[]).token_lists()[0]
    assert engine.stats.prefill_pieces == 1 + pieces


def test_decode_steps_read_only_the_live_blocks_of_each_row(pair, stream, expected):
    """Slots past what any request reaches hold NaNs: a step that read them would turn its
    tokens to garbage (0 * nan in the attention's value product). Idle slots hold NaNs too."""
    engine = Engine(pair, slots=4, max_len=512, layout=SMALL_BLOCKS)
    cache = engine.runtime.state.cache
    poison = dict(k=tuple(x.at[:, :, 256:].set(jnp.nan) for x in cache.k), v=tuple(x.at[:, :, 256:].set(jnp.nan) for x in cache.v))
    engine.runtime.state = engine.runtime.state.replace(cache=cache.replace(**poison))
    for p, lam, n in stream[:6]:
        engine.submit(p, lam=lam, max_new_tokens=n)
    results = engine.run()
    assert [r.tokens for r in results] == expected[:6]
    assert max(len(p) + n for p, _, n in stream[:6]) <= 224  # every row stays in the blocks below the poison


def test_the_pallas_decode_kernel_gives_each_prompts_tokens(pair, stream, expected):
    """The GPU's decode attention (interpreted here): per-row lengths, idle rows read nothing."""
    engine = Engine(pair, slots=3, max_len=192, kernel="pallas")
    assert engine.runtime.state.cache.kernel == "pallas"
    for p, lam, n in stream[:5]:
        engine.submit(p, lam=lam, max_new_tokens=n)
    assert [r.tokens for r in engine.run()] == expected[:5]


def test_no_compilation_after_warmup_across_every_kind_of_change(pair, stream):
    """Lambdas (endpoints, kept and evicted thetas, mixed steps), prompt lengths (packed widths,
    later pieces), rows crossing blocks, slots freeing and refilling, sampling, cancellation."""
    tokenizer = pair.tokenizers["thinking"]
    long_prompt = tokenizer.encode(" a=1, b=a+1." * 10, add_special_tokens=False) + stream[3][0]
    engine = Engine(pair, slots=4, max_len=320, prefill_chunk=64, layout=SMALL_BLOCKS)
    keys = [jax.random.key(i) for i in range(4)]
    engine.warmup()
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **_: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
    )
    for i, (p, lam, n) in enumerate(stream[:24]):
        engine.submit(long_prompt if i % 7 == 3 else p, lam=lam, max_new_tokens=n * 2,
                      sampling=dj.Sampling(temperature=1.0, top_p=0.9) if i % 5 == 0 else dj.GREEDY,
                      key=keys[i % 4] if i % 5 == 0 else None)  # fmt: skip
    early = [e.result for _ in range(6) for e in engine.step() if e.result is not None]
    running = next(r.request.id for r in engine.scheduler.table if r is not None)
    assert engine.cancel(running).finish_reason == "cancelled"
    results = early + engine.run()
    assert len(results) == 23 and engine.stats.interpolations >= 3 and 0 < engine.stats.mixed_steps
    assert compiles == []


def test_serve_takes_one_budget_per_prompt_and_keeps_the_order(pair, stream, expected):
    prompts, lambdas, budgets = zip(*stream[:10])
    out = dj.serve(pair, list(prompts), list(lambdas), max_new_tokens=list(budgets), slots=3, progress=True)
    assert out.tokens.shape == (10, max(budgets))
    assert out.token_lists() == expected[:10]
    same = dj.serve(pair, list(prompts), list(lambdas), max_new_tokens=80, slots=4)
    assert same.token_lists() == [alone(pair, p, lam, 80).token_lists()[0] for p, lam in zip(prompts, lambdas)]
    with pytest.raises(InputError, match=r"max_new_tokens: need one value or one per prompt \(10\)"):
        dj.serve(pair, list(prompts), list(lambdas), max_new_tokens=[8, 8])
    with pytest.raises(InputError, match="prompt 2: prompt: needs at least one token"):
        dj.serve(pair, [prompts[0], prompts[1], []], [0.0, 0.5, 1.0])
    with pytest.raises(InputError, match="lambdas: row 1 is 2.0"):
        dj.serve(pair, list(prompts[:2]), [0.0, 2.0])


@pytest.mark.parametrize("slots, num_kv_heads", [(1, 1), (4, 2)])
def test_engine_steps_update_the_donated_cache_in_place(slots, num_kv_heads):
    size = 777  # a cache length no other array in the step has: a window of 9, then 24 blocks of 32
    cfg = ModelConfig(architecture="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=num_kv_heads, head_dim=16, max_position_embeddings=1024)  # fmt: skip
    with jax.default_device(jax.devices("cpu")[0]):
        params = dj.init_params(cfg, jax.random.key(0))
        state = SlotState.create(SlotKVCache.create(cfg, slots, size, jnp.float32, RowLayout(window=9, block=32)), 4)
        assert state.cache.capacity == size
        starts = jax.tree.map(lambda x: x[:1], state.settings)
        one = Starts(slot=jnp.zeros(1, jnp.int32), last=jnp.zeros(1, jnp.int32), starts=jnp.ones(1, bool), settings=starts)
        zeros = jnp.zeros(32, jnp.int32)
        live, steps = jnp.ones(slots, bool), jnp.int32(2)
        lowered = {
            "decode": decode.lower(params, None, state, live, steps, cfg=cfg, rows=slots, max_steps=4),
            "mixed decode": decode.lower(params, params, state, live, steps, cfg=cfg, rows=1, max_steps=4),
            "packed prefill": prefill.lower(params, state, Pack(zeros, zeros, zeros, zeros), one, cfg=cfg),
            "later piece": prefill.lower(params, state, Piece(zeros, jnp.int32(0), jnp.int32(40), jnp.int32(7)), one, cfg=cfg),
        }
        cache_shape = rf"f32\[{slots},{num_kv_heads},{size},{cfg.head_dim}\]"
        for name, step in lowered.items():
            hlo = step.compile().as_text()
            assert re.search(cache_shape, hlo), name
            copies = [line.strip()[:120] for line in hlo.splitlines() if re.search(cache_shape + r"\S* copy\(", line)]
            assert not copies, (name, copies)


def test_sample_rows_equals_sample_tokens_row_by_row():
    logits = jax.random.normal(jax.random.key(3), (6, 50)) * 3
    keys = jax.random.split(jax.random.key(4), 6)
    settings = [dj.GREEDY, dj.Sampling(1.0), dj.Sampling(0.5, top_k=3), dj.Sampling(1.2, top_p=0.5),
                dj.Sampling(0.9, top_k=10, top_p=0.7), dj.Sampling(1.0, top_k=50, top_p=1.0)]  # fmt: skip
    for draw in range(5):
        row_keys = jax.vmap(lambda k: jax.random.fold_in(k, draw))(keys)
        rows = sample_rows(
            logits, row_keys, jnp.asarray([s.temperature for s in settings], jnp.float32),
            jnp.asarray([s.top_k or 0 for s in settings], jnp.int32),
            jnp.asarray([1.0 if s.top_p is None else s.top_p for s in settings], jnp.float32),
        )  # fmt: skip
        each = [int(sample_tokens(logits[i : i + 1], row_keys[i : i + 1], s)[0]) for i, s in enumerate(settings)]
        assert rows.tolist() == each


@pytest.mark.parametrize("sampled", [False, True])
def test_serve_equals_the_static_path_on_a_routed_mix(pair, stream, sampled):
    """What route-eval serves (per-problem lambdas, per-record keys) is what the static path gave."""
    prompts, lambdas, _ = zip(*stream[:16])
    options = dict(max_new_tokens=64)
    if sampled:
        options.update(sampling=dj.Sampling(temperature=1.0, top_p=0.9), key=jax.random.split(jax.random.key(7), 16))
    static = serve_static(pair, list(prompts), list(lambdas), strategy="bucketed", **options)
    assert dj.serve(pair, list(prompts), list(lambdas), slots=4, **options).token_lists() == static.token_lists()
