"""The engine's device side: the slots' state and the two jitted operations on it.

- :func:`prefill`: run one prefill call, either the packed first pieces of several prompts
  (:class:`Pack`, each into its own slot's row) or a later piece of one prompt (:class:`Piece`);
  where a piece ends its prompt, pick the request's first token and start its slot;
- :func:`decode`: up to ``max_steps`` decode steps (as many as ``steps`` says: data, not a
  compile-time constant) for slots 0..rows-1, the rows bucket the host picked.

Every per-request setting (lambda, sampling, key, stop ids, budget) is data in :class:`SlotState`,
so a slot changing hands never recompiles anything. The state is donated to each call: the cache
is updated in place. The params are a plain tree (a materialized theta(lambda), for prefill and
for a decode where every busy slot shares one lambda), or for a decode with mixed lambdas both
endpoints, mixed per row over ``SlotState.lam`` (:mod:`dami_jax.models.rowmix`). The compiled
set is thus bounded: one :func:`decode` per rows bucket and kind (plain, mixed), one
:func:`prefill` per packed width, and one for later pieces. On a mesh the runtime jits the same
two functions with their output state pinned to its shardings (:func:`jitted_steps`), so the set
stays the same size.
"""

from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from dami_jax.decoding.generation import decode_step
from dami_jax.decoding.sampling import sample_rows, split_key
from dami_jax.engine.cache import PackedView, RowsView, SlotCache
from dami_jax.models.config import ModelConfig
from dami_jax.models.model import decoder, lm_logits
from dami_jax.models.params import Params
from dami_jax.models.rowmix import mix_rows


@flax.struct.dataclass
class Settings:
    """Per-request settings, one row per request [n] (or per slot [slots] in :class:`SlotState`)."""

    key_data: jax.Array  # uint32 [n, ...]: PRNG keys' data, split once per generated token (as generate splits a row's key)
    lam: jax.Array  # float32 [n]
    temperature: jax.Array  # float32 [n]; 0 is greedy
    top_k: jax.Array  # int32 [n]; sampling.NO_TOP_K is off
    top_p: jax.Array  # float32 [n]; 1 is off
    stop: jax.Array  # int32 [n, K]: stop ids, padded with -1
    max_new: jax.Array  # int32 [n]: the request's max_new_tokens

    @classmethod
    def idle(cls, n: int, stop_width: int) -> "Settings":
        """Settings of no request (a buffer of its own for every field: the state is donated)."""
        def full(value, dtype, shape=(n,)):
            return jnp.full(shape, value, dtype)

        return cls(key_data=jax.random.key_data(jax.random.split(jax.random.key(0), n)), lam=full(0, jnp.float32), temperature=full(0, jnp.float32),
                   top_k=full(0, jnp.int32), top_p=full(1, jnp.float32), stop=full(-1, jnp.int32, (n, stop_width)),
                   max_new=full(0, jnp.int32))  # fmt: skip


@flax.struct.dataclass
class SlotState:
    """Every slot's request, as arrays over the slots."""

    cache: SlotCache  # SlotKVCache or SlotTailorKVCache
    settings: Settings  # [slots]
    token: jax.Array  # int32 [slots]: the slot's newest token, the next step's input
    generated: jax.Array  # int32 [slots]: tokens generated so far
    active: jax.Array  # bool [slots]: the slot is decoding

    @classmethod
    def create(cls, cache: SlotCache, stop_width: int) -> "SlotState":
        slots = cache.slots
        return cls(cache=cache, settings=Settings.idle(slots, stop_width), token=jnp.zeros((slots,), jnp.int32),
                   generated=jnp.zeros((slots,), jnp.int32), active=jnp.zeros((slots,), bool))  # fmt: skip


@flax.struct.dataclass
class Pack:
    """First pieces of several prompts packed into P tokens (padding after the last)."""

    tokens: jax.Array  # int32 [P]
    slot: jax.Array  # int32 [P]: the token's slot; past the last slot for padding
    position: jax.Array  # int32 [P]: its place in its prompt
    segment: jax.Array  # int32 [P]: which prompt of the pack it belongs to

    def view(self, cache: SlotCache) -> PackedView:
        return cache.packing(self.slot, self.position, self.segment)


@flax.struct.dataclass
class Piece:
    """A later piece of one prompt: C tokens (``real`` of them, then padding) after ``offset``."""

    tokens: jax.Array  # int32 [C]
    row: jax.Array  # int32 []: the slot
    offset: jax.Array  # int32 []: prompt tokens already in the row
    real: jax.Array  # int32 []

    def view(self, cache: SlotCache) -> RowsView:
        return cache.continuing(self.row, self.offset, self.real, self.tokens.shape[0])


@flax.struct.dataclass
class Starts:
    """The prompts of one prefill call, n rows (padding rows' slot is past the last slot)."""

    slot: jax.Array  # int32 [n]
    last: jax.Array  # int32 [n]: index of the prompt's last token in this call's tokens
    starts: jax.Array  # bool [n]: this piece ends the prompt, so the request starts decoding
    settings: Settings  # [n]


def _pick(logits: jax.Array, settings: Settings) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(carried key data, token int32 [B], its log-prob float32 [B]) from logits [B, V], as
    generate's ``_record`` picks: split each row's key, sample with the second half."""
    keys, sub = split_key(jax.random.wrap_key_data(settings.key_data))
    token = sample_rows(logits, sub, settings.temperature, settings.top_k, settings.top_p)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
    return jax.random.key_data(keys), token, logprob


def _stopped(token: jax.Array, generated: jax.Array, settings: Settings) -> jax.Array:
    return jnp.any(token[:, None] == settings.stop, axis=-1) | (generated >= settings.max_new)


def prefill_call(params: Params, state: SlotState, piece: Pack | Piece, starts: Starts, *, cfg: ModelConfig
                 ) -> tuple[SlotState, jax.Array, jax.Array]:  # fmt: skip
    """Run ``piece`` into its rows; for each prompt whose piece ends it, pick the request's first
    token from the logits after its last token and start its slot. Returns (state, tokens int32
    [n], log-probs float32 [n]), meaningful where ``starts.starts``."""
    hidden, view = decoder(params, cfg, piece.tokens[None], piece.view(state.cache))
    key, token, logprob = _pick(lm_logits(params, hidden[0, starts.last]), starts.settings)
    ones = jnp.ones_like(token)
    starting = jnp.where(starts.starts, starts.slot, state.token.shape[0])  # the others are dropped
    cache = view.cache.started(starting)

    def put(current: jax.Array, value: jax.Array) -> jax.Array:
        return current.at[starting].set(value, mode="drop")

    settings = jax.tree.map(put, state.settings, starts.settings.replace(key_data=key))
    state = state.replace(cache=cache, settings=settings, token=put(state.token, token),
                          generated=put(state.generated, ones),
                          active=put(state.active, ~_stopped(token, ones, starts.settings)))  # fmt: skip
    return state, token, logprob


def decode_call(params: Params, mix_with: Params | None, state: SlotState, live: jax.Array, steps: jax.Array, *,
                cfg: ModelConfig, rows: int, max_steps: int) -> tuple[SlotState, jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """``steps`` (int32 [], at most ``max_steps``) decode steps for slots 0..rows-1; the slots
    past them wait. ``live`` bool [slots]: the slots the host still serves (a cancelled or
    finished request's slot stops here, whatever the device thought). ``mix_with``: None, every
    slot on ``params``; or the other endpoint, each slot then on (1 - lam) ``params`` + lam
    ``mix_with`` at its own lambda. Returns (state, tokens int32 [max_steps, rows], log-probs
    float32 [max_steps, rows], emitted bool [max_steps, rows]: the slot was decoding at that
    step, so that the token belongs to its request)."""
    settings = jax.tree.map(lambda x: x[:rows], state.settings)
    weights = params if mix_with is None else mix_rows(params, mix_with, settings.lam)
    active_all = state.active & live
    outputs = (jnp.zeros((max_steps, rows), jnp.int32), jnp.zeros((max_steps, rows), jnp.float32),
               jnp.zeros((max_steps, rows), bool))  # fmt: skip

    def step(carry):
        i, cache, token, keys, generated, active, outputs = carry
        logits, view = decode_step(weights, cfg, token, cache.decoding(rows, active))
        keys, new, logprob = _pick(logits, settings.replace(key_data=keys))
        generated = generated + active.astype(jnp.int32)
        outputs = tuple(out.at[i].set(value) for out, value in zip(outputs, (new, logprob, active)))
        token = jnp.where(active, new, token)
        return i + 1, view.cache, token, keys, generated, active & ~_stopped(new, generated, settings), outputs

    carry = (jnp.zeros((), jnp.int32), state.cache.narrow(rows), state.token[:rows], settings.key_data, state.generated[:rows],
             active_all[:rows], outputs)  # fmt: skip
    _, cache, token, keys, generated, active, outputs = jax.lax.while_loop(lambda c: c[0] < steps, step, carry)

    def head(full: jax.Array, part: jax.Array) -> jax.Array:
        return full.at[:rows].set(part)

    state = state.replace(cache=state.cache.widen(cache), token=head(state.token, token), generated=head(state.generated, generated),
                          active=head(active_all, active),
                          settings=state.settings.replace(key_data=head(state.settings.key_data, keys)))  # fmt: skip
    return state, *outputs


def jitted_steps(state: SlotState | None = None, replicated: jax.sharding.Sharding | None = None) -> tuple[Callable, Callable]:
    """(prefill, decode) jitted, the state donated. On a mesh, ``state`` (a tree of the state's
    shardings) pins each call's output state to the layout it came in with, and ``replicated``
    its other outputs, so that no call meets a new layout and compiles again."""
    outputs = (lambda n: None) if state is None else (lambda n: (state, *(replicated,) * n))
    return (jax.jit(prefill_call, static_argnames="cfg", donate_argnames="state", out_shardings=outputs(2)),
            jax.jit(decode_call, static_argnames=("cfg", "rows", "max_steps"), donate_argnames="state", out_shardings=outputs(3)))


prefill, decode = jitted_steps()  # on one device
