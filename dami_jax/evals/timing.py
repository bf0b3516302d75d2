"""Wall-clock timing for the benchmark scripts: warm up, then time each call until its result is
ready (jax dispatch is asynchronous, so every call is waited for with ``block_until_ready``)."""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def call_times(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds taken by each of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls
    (compilation, allocator and thread-pool start-up)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - started)
    return times


def copy_times(nbytes: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` in-place ``x = -x`` over ``nbytes`` (a multiple of 4) of
    float32 on JAX's default device, a copy that reads and writes every byte once: the ceiling of
    a memory-bound step, measured in the same run. The buffer is donated, so no fresh output is
    allocated and faulted in on each call."""
    state = {"x": jax.random.normal(jax.random.key(0), (nbytes // 4,), jnp.float32)}
    negate = jax.jit(jnp.negative, donate_argnums=0)

    def call():
        state["x"] = negate(state["x"])
        return state["x"]

    return call_times(call, repeats, warmup=2)
