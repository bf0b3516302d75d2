"""The scheduler's decisions, without a model: admission into the lowest free slot, the rows bucket of
a decode call, the prefill budget and packing, budgets that hand a slot over on time, and what
comes back from the device (stop ids, cancellation while tokens are in flight)."""

from __future__ import annotations

import numpy as np
import pytest

from dami_jax.decoding.sampling import GREEDY
from dami_jax.engine.requests import Request
from dami_jax.engine.scheduler import Scheduler, bucket, buckets

STOP = 2


def request(rid: int, prompt_len: int = 10, lam: float = 0.0, max_new: int = 8) -> Request:
    return Request(rid, tuple(range(3, 3 + prompt_len)), lam, max_new, GREEDY, np.zeros(2, np.uint32), (STOP,), 0.0)


def scheduler(slots: int = 8, chunk: int = 256, steps: int = 4, admission: str = "fifo", requests=()) -> Scheduler:
    s = Scheduler(slots, prefill_chunk=chunk, steps_per_call=steps, admission=admission)
    for r in requests:
        s.submit(r)
    return s


def test_buckets_are_powers_of_two_then_the_limit():
    assert buckets(8) == (1, 2, 4, 8)
    assert buckets(6) == (1, 2, 4, 6)
    assert buckets(256, 32) == (32, 64, 128, 256)
    assert buckets(1) == (1,)
    assert [bucket(n, buckets(6)) for n in (1, 2, 3, 5, 6)] == [1, 2, 4, 6, 6]


def test_a_lone_request_decodes_in_the_smallest_rows_bucket():
    s = scheduler(requests=[request(0)])
    plan = s.plan()
    assert [e[0].slot for p in plan.packs for e in p.entries] == [0]
    assert plan.decode.rows == 1 and plan.decode.lam == 0.0
    assert plan.decode.live == (True,) + (False,) * 7


def test_requests_take_the_lowest_free_slots_and_the_rows_bucket_covers_the_highest():
    s = scheduler(requests=[request(i) for i in range(5)])
    assert s.plan().decode.rows == 8  # slots 0-4 busy
    first = s.table[0]
    s.deliver(first, [STOP], [0.0])  # slot 0's request stopped
    s.submit(request(5))
    plan = s.plan()
    assert s.table[0].request.id == 5  # the freed lowest slot
    assert plan.decode.rows == 8


def test_a_slot_whose_budget_the_dispatched_steps_use_up_is_handed_over_in_the_same_plan():
    s = scheduler(steps=4, requests=[request(0, max_new=3), request(1, max_new=20)])
    plan = s.plan()  # prefill (1 token each) + 4 decode steps
    assert plan.decode.steps == 4
    assert s.table[0] is None and 0 in s.finishing  # 1 + 4 >= 3: its tokens are all on their way
    s.submit(request(2))
    plan = s.plan()
    assert s.table[0].request.id == 2
    assert not s.idle


def test_decode_calls_shorten_only_while_requests_wait():
    s = scheduler(slots=1, steps=8, requests=[request(0, max_new=5)])
    assert s.plan().decode.steps == 8  # nothing waits: run the whole call
    s = scheduler(slots=1, steps=8, requests=[request(0, max_new=5), request(1)])
    assert s.plan().decode.steps == 4  # the next request gets the slot as soon as the budget ends


def test_prefill_packs_first_pieces_per_lambda_within_the_budget():
    s = scheduler(chunk=128, requests=[request(0, 100), request(1, 50, lam=0.0), request(2, 300), request(3, 20, lam=0.5)])
    plan = s.plan()
    assert [(p.lam, p.width, [(e[0].request.id, e[1]) for e in p.entries]) for p in plan.packs] == [(0.0, 128, [(0, 100), (1, 28)])]
    assert plan.pieces == () and plan.decode.rows == 1  # only request 0 finished its prompt
    plan = s.plan()  # request 1 continues (22 tokens); request 2 starts (106); budget spent
    assert [(p.running.request.id, p.offset, p.real) for p in plan.pieces] == [(1, 28, 22)]
    assert [(p.width, [(e[0].request.id, e[1]) for e in p.entries]) for p in plan.packs] == [(128, [(2, 106)])]
    plan = s.plan()
    assert [(p.running.request.id, p.offset, p.real) for p in plan.pieces] == [(2, 106, 128)]
    plan = s.plan()  # request 2's last 66 tokens, then request 3 at its own lambda
    assert [(p.running.request.id, p.offset, p.real) for p in plan.pieces] == [(2, 234, 66)]
    assert [(p.lam, p.width, [(e[0].request.id, e[1]) for e in p.entries]) for p in plan.packs] == [(0.5, 32, [(3, 20)])]
    assert plan.decode.lam is None  # lambdas 0 and 0.5 decode together: mixed per row


def test_deliveries_finish_requests_and_ignore_cancelled_ones():
    s = scheduler(requests=[request(0, max_new=3), request(1, max_new=8), request(2)])
    s.plan()
    r0, r1, r2 = s.finishing[0], s.table[1], s.table[2]  # request 0's budget (3) is all on its way
    assert s.deliver(r1, [7], [-0.5]).result is None
    event = s.deliver(r1, [8, STOP], [-1.0, -0.1])
    assert event.tokens == (8, STOP) and event.result.finish_reason == "stop" and event.result.tokens == [7, 8, STOP]
    assert s.table[1] is None
    assert s.deliver(r0, [5, 6, 7], [0.0] * 3).result.finish_reason == "length"  # budget 3: finished
    cancelled = s.cancel(2)
    assert cancelled.finish_reason == "cancelled" and s.table[2] is None
    assert s.deliver(r2, [9], [0.0]) is None  # its tokens were in flight
    assert s.cancel(2) is None and s.idle


def test_group_admission_prefers_the_busy_lambda_but_never_starves_the_head():
    s = scheduler(slots=2, admission="group", requests=[request(0, lam=0.5), request(1, lam=1.0), request(2, lam=0.5)])
    s._admit()
    assert [r.request.id for r in s.table] == [0, 2]
    s = scheduler(slots=2, admission="lambda", requests=[request(0, lam=1.0), request(1, lam=0.0), request(2, lam=0.5)])
    s._admit()
    assert [r.request.id for r in s.table] == [1, 2]


@pytest.mark.parametrize("slots", [3, 8])
def test_a_stream_of_fake_deliveries_ends_idle_with_every_request_answered(slots):
    """Drive the scheduler as the engine does, with a fake device whose every token is 5 (so only
    budgets end requests), one step late: every request gets exactly its budget, and the rows
    bucket never exceeds the highest busy slot's."""
    rng = np.random.default_rng(0)
    s = scheduler(slots=slots, chunk=64, steps=4)
    budgets = {i: int(rng.integers(1, 12)) for i in range(30)}
    for i, n in budgets.items():
        s.submit(request(i, int(rng.integers(1, 150)), lam=float(rng.choice([0.0, 1.0])), max_new=n))
    answered, in_flight = {}, []
    for _ in range(500):
        plan = s.plan()
        sent = [(e[0], 1) for p in plan.packs for e in p.entries if not e[0].prefilling]
        sent += [(p.running, 1) for p in plan.pieces if not p.running.prefilling]
        if plan.decode:
            assert plan.decode.rows == bucket(1 + max(r.slot for r in plan.decode.decoding), s.row_buckets)
            sent += [(r, plan.decode.steps) for r in plan.decode.decoding]
        for running, count in in_flight:
            want = min(count, running.request.max_new_tokens - len(running.tokens))
            event = s.deliver(running, [5] * want, [0.0] * want)
            if event is not None and event.result is not None:
                answered[event.id] = event.result
        in_flight = sent
        if s.idle and not in_flight:
            break
    assert {i: len(r.tokens) for i, r in answered.items()} == budgets
