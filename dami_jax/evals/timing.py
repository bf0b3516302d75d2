"""Wall-clock timing for the benchmark scripts: warm up, then time each call until its result is
ready (jax dispatch is asynchronous, so every call is waited for with ``block_until_ready``)."""

from __future__ import annotations

import time
from typing import Any, Callable

import jax


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
