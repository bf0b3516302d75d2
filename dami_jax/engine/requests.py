"""What goes into the engine and what comes out: requests (checked before they can take a slot),
token events and results."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dami_jax.decoding.sampling import Sampling
from dami_jax.errors import InputError
from dami_jax.models.config import ModelConfig



@functools.cache
def greedy_key() -> jax.Array:
    """What a greedy request without a key carries (never drawn from)."""
    return jax.random.key(0)


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked request, as the engine queues it."""

    id: int
    prompt: tuple[int, ...]
    lam: float
    max_new_tokens: int
    sampling: Sampling
    key_data: np.ndarray  # its PRNG key's data (jax.random.key_data); a fixed key when greedy without one
    stop_tokens: tuple[int, ...]
    submitted: float  # time.perf_counter() at submit


@dataclasses.dataclass(frozen=True)
class Result:
    """A finished request. ``finish_reason``: "stop" (a stop id, included in ``tokens``),
    "length" (``max_new_tokens`` reached) or "cancelled"."""

    id: int
    lam: float
    prompt_tokens: int
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    submitted: float  # perf_counter() timestamps
    first_token: float | None
    finished: float

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.submitted

    @property
    def latency(self) -> float:
        return self.finished - self.submitted


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """New tokens of one request since its last event; ``result`` is set when it finished."""

    id: int
    tokens: tuple[int, ...]
    result: Result | None = None


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What an engine accepts: checks a request's every argument, naming the one at fault."""

    cfg: ModelConfig
    context: int  # prompt + generated tokens per request
    max_stop_tokens: int
    extrapolate: bool = False
    max_new_tokens: int | None = None  # the most a request may generate (TailorKV: the device store of generated tokens)

    def check(self, request_id: int, prompt, lam, max_new_tokens, sampling, key, stop_tokens) -> Request:
        """A :class:`Request`, or :class:`InputError` naming the argument at fault."""
        cfg = self.cfg
        try:
            prompt = tuple(int(t) for t in prompt)
        except (TypeError, ValueError):
            raise InputError(f"prompt: must be a sequence of token ids, got {type(prompt).__name__}") from None
        if not prompt:
            raise InputError("prompt: needs at least one token")
        outside = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if outside:
            raise InputError(f"prompt: token id {outside[0]} is outside the vocabulary [0, {cfg.vocab_size})")
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens: must be an integer >= 1, got {max_new_tokens!r}")
        if len(prompt) + max_new_tokens > self.context:
            raise InputError(f"max_new_tokens: the prompt's {len(prompt)} tokens + max_new_tokens={max_new_tokens} exceed "
                             f"the engine's context of {self.context} tokens per request")  # fmt: skip
        if self.max_new_tokens is not None and max_new_tokens > self.max_new_tokens:
            raise InputError(f"max_new_tokens: {max_new_tokens} is more than the engine's max_new_tokens={self.max_new_tokens} "
                             "(its TailorKV cache keeps that many generated tokens per slot on the device)")  # fmt: skip
        try:
            lam = float(lam)
        except (TypeError, ValueError):
            raise InputError(f"lam: must be a number, got {lam!r}") from None
        if not math.isfinite(lam) or (not self.extrapolate and not 0.0 <= lam <= 1.0):
            raise InputError(f"lam: {lam} is outside [0, 1]" + ("" if math.isfinite(lam) else " (not finite)"))
        if not isinstance(sampling, Sampling):
            raise InputError(f"sampling: must be a dj.Sampling, got {type(sampling).__name__}")
        if key is None:
            if not sampling.greedy:
                raise InputError("key: sampling with temperature > 0 needs an explicit PRNG key (jax.random.key(seed))")
            key = greedy_key()
        elif not (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()):
            raise InputError(f"key: need one PRNG key (jax.random.key(seed)), got {key.dtype} {key.shape}")
        elif str(jax.random.key_impl(key)) != str(jax.random.key_impl(greedy_key())):
            raise InputError(f"key: a {jax.random.key_impl(key)} key; the engine carries {jax.random.key_impl(greedy_key())} keys")
        stop = cfg.eos_token_ids if stop_tokens is None else tuple(int(t) for t in stop_tokens)
        if len(stop) > self.max_stop_tokens:
            raise InputError(f"stop_tokens: {len(stop)} ids, more than the engine's max_stop_tokens={self.max_stop_tokens}")
        key_data = np.asarray(jax.random.key_data(key))
        return Request(request_id, prompt, lam, int(max_new_tokens), sampling, key_data, tuple(stop), time.perf_counter())


def result_of(request: Request, tokens: Sequence[int], logprobs: Sequence[float], reason: str, first_token: float | None) -> Result:
    return Result(request.id, request.lam, len(request.prompt), list(tokens), list(logprobs), reason, request.submitted,
                  first_token, time.perf_counter())  # fmt: skip
