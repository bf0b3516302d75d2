"""Log-probabilities for responses (``logprobs``, ``top_logprobs``, ``echo``), in OpenAI's shapes.

The engine reports only each sampled token's log-prob; a response that asks for the likeliest
alternatives, or for the prompt's own tokens (``echo``), needs the whole distribution at every
position. :class:`Scorer` gets it with one causal pass of prompt + answer through theta(lambda)
(both endpoints' weight ops mixed for the request's row, so no model is materialized; exactly
the endpoints at lambda 0 and 1), which is what ``dj.forward`` computes, and keeps per position
only the token's log-prob and the :data:`MAX_TOP` likeliest. Lengths are padded to a power of two
(a bounded set of compiled shapes), and the vocabulary-wide log-softmax is taken :data:`BLOCK`
positions at a time, so memory stays at [BLOCK, vocab] however long the sequence.
"""

from __future__ import annotations

import codecs
import dataclasses
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import decoders

from dami_jax.dami.pair import ModelPair
from dami_jax.models.config import ModelConfig
from dami_jax.models.model import decoder, lm_logits
from dami_jax.models.params import Params
from dami_jax.models.rowmix import mix_rows
from dami_jax.models.tokenizer import byte_alphabet

MAX_TOP = 20  # OpenAI's largest top_logprobs
BLOCK = 64  # positions whose log-softmax over the vocabulary is taken at once


@dataclasses.dataclass(frozen=True)
class Scored:
    """One position: its token, that token's log-prob (None for a sequence's first token, which
    nothing predicts), and the likeliest tokens there (best first)."""

    token: int
    logprob: float | None
    top_ids: np.ndarray  # int [MAX_TOP]
    top_logprobs: np.ndarray  # float32 [MAX_TOP]


@partial(jax.jit, static_argnames="cfg")
def _score(params: Params, cfg: ModelConfig, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """tokens int32 [1, L] (L a multiple of BLOCK) -> at each position p < L: log p(tokens[p + 1])
    float32 [L], and the MAX_TOP likeliest next tokens' log-probs float32 [L, K] and ids int32 [L, K]."""
    hidden, _ = decoder(params, cfg, tokens)
    length = tokens.shape[1]
    targets = jnp.roll(tokens[0], -1).reshape(length // BLOCK, BLOCK)

    def block(args):
        rows, target = args
        logprobs = jax.nn.log_softmax(lm_logits(params, rows[None])[0])  # [BLOCK, vocab]
        values, ids = jax.lax.top_k(logprobs, MAX_TOP)
        return jnp.take_along_axis(logprobs, target[:, None], axis=-1)[:, 0], values, ids

    chosen, values, ids = jax.lax.map(block, (hidden[0].reshape(length // BLOCK, BLOCK, -1), targets))
    return chosen.reshape(length), values.reshape(length, MAX_TOP), ids.reshape(length, MAX_TOP)


class Scorer:
    """Log-probs of given tokens on theta(lambda) of ``pair``."""

    def __init__(self, pair: ModelPair):
        self.pair = pair

    def score(self, lam: float, tokens: Sequence[int], start: int) -> list[Scored]:
        """For each position i in [start, len(tokens)): log p(tokens[i] | tokens[:i]) on theta(lam)
        and the likeliest tokens there. Blocks until computed: call it off the event loop."""
        length = max(BLOCK, 1 << (len(tokens) - 1).bit_length())
        padded = np.zeros((1, length), np.int32)
        padded[0, : len(tokens)] = tokens
        params = mix_rows(self.pair.instruct, self.pair.thinking, jnp.asarray([lam], jnp.float32))
        chosen, values, ids = jax.device_get(_score(params, self.pair.cfg, jnp.asarray(padded)))
        first = [Scored(int(tokens[0]), None, ids[:0, 0], values[:0, 0])] if start == 0 else []
        return first + [Scored(int(tokens[i]), float(chosen[i - 1]), ids[i - 1], values[i - 1]) for i in range(max(start, 1), len(tokens))]


class Spelling:
    """Each token's bytes and text as OpenAI's logprobs show them: a byte-level BPE token is
    its bytes (possibly part of a character, whose text then shows U+FFFD); any other token is
    its decoded text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        byte_level = isinstance(tokenizer.backend_tokenizer.decoder, decoders.ByteLevel)
        self._bytes_of = {c: b for b, c in byte_alphabet().items()} if byte_level else None
        self._known: dict[int, bytes] = {}

    def bytes(self, token: int) -> bytes:
        if token not in self._known:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            if self._bytes_of is not None and set(piece) <= self._bytes_of.keys():
                self._known[token] = bytes(self._bytes_of[c] for c in piece)
            else:
                self._known[token] = self.tokenizer.decode([token]).encode()
        return self._known[token]

    def text(self, token: int) -> str:
        return self.bytes(token).decode("utf-8", errors="replace")

    def chat_entry(self, token: int, logprob: float, top: Sequence[tuple[int, float]] = ()) -> dict[str, Any]:
        """One entry of a chat choice's ``logprobs.content``."""
        entry = {"token": self.text(token), "logprob": logprob, "bytes": list(self.bytes(token))}
        if top is not None:
            entry["top_logprobs"] = [self.chat_entry(t, lp, None) for t, lp in top]
        return entry

    def chat_logprobs(self, scored: Sequence[Scored], top: int) -> dict[str, Any]:
        """A chat choice's ``logprobs`` (or a stream chunk's): the tokens with ``top`` alternatives each."""
        content = [self.chat_entry(s.token, s.logprob, _top(s, top)) for s in scored]
        return {"content": content, "refusal": None}

    def completion_logprobs(self, scored: Sequence[Scored], top: int, offset: int) -> dict[str, Any]:
        """A completion choice's ``logprobs``: tokens, their log-probs, the ``top`` likeliest plus the
        chosen one as {text: log-prob}, and where each token starts in the text (from ``offset``)."""
        tokens, logprobs, tops, offsets = [], [], [], []
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for s in scored:
            offsets.append(offset)
            tokens.append(self.text(s.token))
            offset += len(text.decode(self.bytes(s.token)))
            logprobs.append(s.logprob)
            tops.append(None if s.logprob is None else {self.text(t): lp for t, lp in [*_top(s, top), (s.token, s.logprob)]})
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def _top(scored: Scored, count: int) -> list[tuple[int, float]]:
    return [(int(t), float(lp)) for t, lp in zip(scored.top_ids[:count], scored.top_logprobs[:count])]
