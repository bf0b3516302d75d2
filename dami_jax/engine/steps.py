"""The engine's device side: the slots' state and the two jitted operations on it.

- :func:`prefill`: run a piece of each of several prompts into their slots' cache rows, and
  where a prompt is done, pick its first token and start its slot;
- :func:`decode`: ``steps`` decode steps for every slot at once (one ``lax.scan``).

Every per-request setting (lambda, sampling, key, stop ids, budget) is data in
:class:`SlotState`, so a slot changing hands never recompiles anything. The state is donated to
each call: the cache is updated in place. The params are a plain tree (a materialized
theta(lambda), for prefill and for a decode where every busy slot shares one lambda), or for a
decode with mixed lambdas both endpoints, mixed per row over ``SlotState.lam``
(:mod:`dami_jax.models.rowmix`): two compilations of :func:`decode` per ``steps``.
"""

from __future__ import annotations

from functools import partial

import flax.struct
import jax
import jax.numpy as jnp

from dami_jax.decoding.generation import decode_step
from dami_jax.decoding.sampling import sample_rows, split_key
from dami_jax.engine.cache import SlotKVCache
from dami_jax.models.config import ModelConfig
from dami_jax.models.model import decoder, lm_logits
from dami_jax.models.params import Params
from dami_jax.models.rowmix import mix_rows


@flax.struct.dataclass
class SlotState:
    """Every slot's request, as arrays over the slots [B]."""

    cache: SlotKVCache
    token: jax.Array  # int32 [B]: the slot's newest token, the next step's input
    key: jax.Array  # PRNG keys [B], split once per generated token (as generate splits a row's key)
    lam: jax.Array  # float32 [B]: the slot's lambda
    temperature: jax.Array  # float32 [B]; 0 is greedy
    top_k: jax.Array  # int32 [B]; sampling.NO_TOP_K is off
    top_p: jax.Array  # float32 [B]; 1 is off
    stop: jax.Array  # int32 [B, K]: stop ids, padded with -1
    generated: jax.Array  # int32 [B]: tokens generated so far
    max_new: jax.Array  # int32 [B]: the request's max_new_tokens
    active: jax.Array  # bool [B]: the slot is decoding

    @classmethod
    def create(cls, cfg: ModelConfig, slots: int, size: int, stop_width: int, dtype) -> "SlotState":
        def full(value, dtype, shape=(slots,)):  # a buffer of its own for every field: the state is donated
            return jnp.full(shape, value, dtype)

        return cls(
            cache=SlotKVCache.create(cfg, slots, size, dtype), token=full(0, jnp.int32),
            key=jax.random.split(jax.random.key(0), slots), lam=full(0, jnp.float32), temperature=full(0, jnp.float32),
            top_k=full(0, jnp.int32), top_p=full(1, jnp.float32), stop=full(-1, jnp.int32, (slots, stop_width)),
            generated=full(0, jnp.int32), max_new=full(0, jnp.int32), active=full(False, bool),
        )  # fmt: skip


@flax.struct.dataclass
class Pieces:
    """n prompt pieces for :func:`prefill`, one per row, each with its request's settings (read
    where the piece ends its prompt and so starts the request)."""

    slot: jax.Array  # int32 [n]: the row's slot; past the last slot, a padding row (computed, then dropped)
    tokens: jax.Array  # int32 [n, C]: the piece, padded after its ``real`` tokens
    offset: jax.Array  # int32 [n]: prompt tokens already in the slot's row
    real: jax.Array  # int32 [n]
    starts: jax.Array  # bool [n]: the piece ends its prompt
    key_data: jax.Array  # uint32 [n, ...]: the request's PRNG key, as jax.random.key_data gives it
    lam: jax.Array  # float32 [n]
    temperature: jax.Array  # float32 [n]
    top_k: jax.Array  # int32 [n]
    top_p: jax.Array  # float32 [n]
    stop: jax.Array  # int32 [n, K]
    max_new: jax.Array  # int32 [n]

    @classmethod
    def greedy(cls, slots: jax.Array, tokens: jax.Array, offset: jax.Array, stop_width: int, max_new: int = 16) -> "Pieces":
        """Whole rows of ``tokens`` [n, C] that end greedy requests' prompts (at lambda 0, no stop
        ids): the plainest input of :func:`prefill`, for timing and compile checks."""
        n = tokens.shape[0]
        return cls(
            slot=jnp.asarray(slots, jnp.int32), tokens=jnp.asarray(tokens, jnp.int32), offset=jnp.asarray(offset, jnp.int32),
            real=jnp.full((n,), tokens.shape[1], jnp.int32), starts=jnp.ones((n,), bool),
            key_data=jax.random.key_data(jax.random.split(jax.random.key(0), n)), lam=jnp.zeros((n,), jnp.float32),
            temperature=jnp.zeros((n,), jnp.float32), top_k=jnp.zeros((n,), jnp.int32), top_p=jnp.ones((n,), jnp.float32),
            stop=jnp.full((n, stop_width), -1, jnp.int32), max_new=jnp.full((n,), max_new, jnp.int32),
        )  # fmt: skip


def _pick(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(carried keys, token int32 [B], its log-prob float32 [B]) from logits [B, V], as
    generate's ``_record`` picks: split each row's key, sample with the second half."""
    keys, sub = split_key(keys)
    token = sample_rows(logits, sub, temperature, top_k, top_p)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
    return keys, token, logprob


@partial(jax.jit, static_argnames=("cfg", "fresh"), donate_argnames="state")
def prefill(params: Params, state: SlotState, pieces: Pieces, *, cfg: ModelConfig, fresh: bool
            ) -> tuple[SlotState, jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """Run each piece into its slot's row after the row's first ``offset`` tokens; where a piece
    ends its prompt, pick the request's first token from the logits after its last real token
    and start the slot. Returns (state, tokens int32 [n], log-probs float32 [n], finished bool
    [n]: done at its first token), meaningful where ``pieces.starts``. The padding's K/V land past
    the row's new length, masked until decode overwrites them.

    ``fresh``: every offset is 0 (a prompt's first piece). The piece then attends within a
    cache of its own C slots, which is copied into the rows' first C slots, instead of reading
    whole rows out of the engine's cache and attending over all of them (a third less time for
    short prompts on a small model)."""
    if fresh:
        rows = SlotKVCache.create(cfg, pieces.tokens.shape[0], pieces.tokens.shape[1], state.cache.k[0].dtype)
    else:
        rows = state.cache.rows(pieces.slot).replace(length=pieces.offset)
    hidden, rows = decoder(params, cfg, pieces.tokens, rows)
    last = jnp.take_along_axis(hidden, (pieces.real - 1)[:, None, None], axis=1)[:, 0]
    cache = state.cache.with_rows(pieces.slot, rows.replace(length=pieces.offset + pieces.real))
    key, token, logprob = _pick(lm_logits(params, last), jax.random.wrap_key_data(pieces.key_data), pieces.temperature,
                                pieces.top_k, pieces.top_p)  # fmt: skip
    finished = jnp.any(token[:, None] == pieces.stop, axis=-1) | (pieces.max_new <= 1)
    starting = jnp.where(pieces.starts, pieces.slot, state.token.shape[0])  # the others are dropped

    def put(field: str, value: jax.Array) -> jax.Array:
        return getattr(state, field).at[starting].set(value, mode="drop")

    state = state.replace(
        cache=cache, token=put("token", token), key=put("key", key), lam=put("lam", pieces.lam),
        temperature=put("temperature", pieces.temperature), top_k=put("top_k", pieces.top_k),
        top_p=put("top_p", pieces.top_p), stop=put("stop", pieces.stop), generated=put("generated", jnp.ones_like(token)),
        max_new=put("max_new", pieces.max_new), active=put("active", ~finished),
    )  # fmt: skip
    return state, token, logprob, finished


def _step(params: Params, cfg: ModelConfig, state: SlotState, _) -> tuple[SlotState, tuple[jax.Array, jax.Array, jax.Array]]:
    """One decode step for every slot; idle slots run along (static shapes) but change nothing
    that matters: their length, token and count stay."""
    active = state.active
    logits, cache = decode_step(params, cfg, state.token, state.cache)
    cache = cache.replace(length=jnp.where(active, cache.length, state.cache.length))
    key, token, logprob = _pick(logits, state.key, state.temperature, state.top_k, state.top_p)
    generated = state.generated + active.astype(jnp.int32)
    finished = jnp.any(token[:, None] == state.stop, axis=-1) | (generated >= state.max_new)
    state = state.replace(
        cache=cache, key=key, token=jnp.where(active, token, state.token), generated=generated,
        active=active & ~finished,
    )  # fmt: skip
    return state, (token, logprob, active)


@partial(jax.jit, static_argnames=("cfg", "steps"), donate_argnames="state")
def decode(params: Params, mix_with: Params | None, state: SlotState, *, cfg: ModelConfig, steps: int
           ) -> tuple[SlotState, jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """``steps`` decode steps for every slot. ``mix_with``: None, every slot on ``params``; or the
    other endpoint, each slot then on (1 - lam) ``params`` + lam ``mix_with`` with its own
    ``state.lam``, mixed per row. Returns (state, tokens int32 [steps, B], log-probs float32
    [steps, B], emitted bool [steps, B]: whether the slot was decoding at that step, so that the
    token belongs to its request)."""
    weights = params if mix_with is None else mix_rows(params, mix_with, state.lam)
    state, (tokens, logprobs, emitted) = jax.lax.scan(partial(_step, weights, cfg), state, None, length=steps)
    return state, tokens, logprobs, emitted
