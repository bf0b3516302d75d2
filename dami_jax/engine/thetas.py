"""Materialized theta(lambda)s for the engine, kept for the lambdas used most recently.

The endpoints cost nothing (lambda 0 and 1 are the pair's own trees, bit for bit). Any other
lambda costs one interpolation (a read of both endpoints and a write of a third model) and one
model's memory while it is kept; the least recently used one is overwritten in place
(``interpolate(..., out=...)``) when the cache is full.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import jax

from dami_jax.dami.interpolation import interpolate
from dami_jax.dami.pair import ModelPair
from dami_jax.models.params import Params


class ThetaCache:
    """theta(lambda) on demand, at most ``capacity`` interpolated trees alive (0: none kept)."""

    def __init__(self, pair: ModelPair, capacity: int, extrapolate: bool = False):
        if capacity < 0:
            raise ValueError(f"theta_cache must be >= 0, got {capacity}")
        self.pair, self.capacity, self.extrapolate = pair, capacity, extrapolate
        self._kept: OrderedDict[float, Params] = OrderedDict()
        self.interpolations = 0
        self.interpolation_s = 0.0

    def get(self, lam: float) -> Params:
        """theta(lam): an endpoint, a kept tree, or a new interpolation (timed)."""
        if lam == 0.0:
            return self.pair.instruct
        if lam == 1.0:
            return self.pair.thinking
        if lam in self._kept:
            self._kept.move_to_end(lam)
            return self._kept[lam]
        reuse = self._kept.popitem(last=False)[1] if self.capacity and len(self._kept) >= self.capacity else None
        started = time.perf_counter()
        theta = jax.block_until_ready(interpolate(self.pair.instruct, self.pair.thinking, lam, out=reuse, extrapolate=self.extrapolate))
        self.interpolations += 1
        self.interpolation_s += time.perf_counter() - started
        if self.capacity:
            self._kept[lam] = theta
        return theta

    def warmup(self) -> None:
        """Compile the interpolations :meth:`get` runs (a new tree; one written over a kept one)."""
        theta = interpolate(self.pair.instruct, self.pair.thinking, 0.5, extrapolate=self.extrapolate)
        if self.capacity:
            theta = interpolate(self.pair.instruct, self.pair.thinking, 0.5, out=theta, extrapolate=self.extrapolate)
        jax.block_until_ready(theta)
