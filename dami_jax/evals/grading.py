"""Final-answer extraction and grading for math benchmarks.

Extraction is ours (small, predictable regexes); equivalence is ``math_verify``'s (fractions vs
decimals, ``\\dfrac``, units, percentages, intervals, tuples, symbolic expressions), with a cheap
exact/numeric compare first that also covers the toy pair's ``Answer: <integer>`` format.

Think blocks (Qwen3-2507 Thinking): the reasoning sits in ``<think> ... </think>`` and the answer
after it. An answer is read only from the text after the last ``</think>``; a think block that
never closed (the model ran out of tokens while thinking) has no final answer. The Thinking
model's chat template opens the block inside the *prompt*, so the response alone does not show
it: pass ``think_opened=True`` (see :func:`dami_jax.evals.prompts.think_status`).

math_verify timeouts use ``signal.alarm``, which Python allows only in the main thread: there
math_verify raises ``ValueError`` unless its timeouts are disabled (``parsing_timeout=None`` for
``parse``, ``timeout_seconds=None`` for ``verify``). :func:`grade` therefore uses timeouts in the
main thread and disables them elsewhere. Without a timeout a pathological answer (a power tower
such as ``9^{9^{9^{9}}}``) can run for ever, so grade untrusted outputs in the main thread of a
process (a process pool is fine), not in a thread pool. math_verify's ``alarm(0)`` would also
cancel an alarm the caller had pending; :func:`answers_match` re-arms it.
"""

from __future__ import annotations

import math
import re
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from decimal import Decimal, InvalidOperation
from typing import Iterator

from dami_jax.evals.benchmarks import GSM8K_ANSWER
from dami_jax.models.tokenizer import THINK_CLOSE, THINK_OPEN

DEFAULT_TIMEOUT_S = 5

ANSWER_LINE = re.compile(r"Answer:\s*([-+]?\d+)(?![\d,/]|\.\d)")  # the toy pair's "Answer: 84"
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER_THEN_WORDS = re.compile(r"^([-+]?\d[\d,]*(?:\.\d+)?)\s+[A-Za-z][A-Za-z\s.]*$")  # "72 dollars"
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:(?:,|\{,\})\d{3})+(?:\.\d+)?$")


def final_text(response: str, *, think_opened: bool = False) -> str | None:
    """The part of a response that may hold the final answer: after the last ``</think>``;
    ``None`` while a think block (opened by the prompt or by the model) is still open."""
    open_at, close_at = response.rfind(THINK_OPEN), response.rfind(THINK_CLOSE)
    if open_at > close_at:
        return None
    if close_at >= 0:
        return response[close_at + len(THINK_CLOSE) :]
    return None if think_opened else response


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces included.
    A box cut off by the token limit is skipped in favour of an earlier complete one."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{" and text[i - 1] != "\\":
                depth += 1
            elif text[i] == "}" and text[i - 1] != "\\":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


def extract_answer(response: str, *, think_opened: bool = False) -> str | None:
    """The final answer string of a model response, or ``None`` when there is none.

    Formats, first found wins: the last ``\\boxed{...}`` (MATH/AIME style), the last GSM8K
    ``#### 42`` line, the last toy ``Answer: <integer>``."""
    text = final_text(response, think_opened=think_opened)
    if text is None:
        return None
    if (boxed := last_boxed(text)) is not None:
        return boxed or None
    if found := GSM8K_ANSWER.findall(text):
        line = found[-1].strip().rstrip(".").strip()
        if not (len(line) > 1 and line[0] == line[-1] == "$"):  # "$72", not "$\frac{1}{2}$"
            line = re.sub(r"^\\?\$\s*", "", line)
        return m.group(1) if (m := _NUMBER_THEN_WORDS.match(line)) else line or None
    if found := ANSWER_LINE.findall(text):
        return found[-1].lstrip("+")
    return None


def _clean(answer: str) -> str:
    """Strip what is never part of an answer: outer ``$...$``, a final period, thousands commas."""
    s = answer.strip()
    if len(s) >= 2 and s[0] == s[-1] == "$":
        s = s[1:-1].strip()
    s = s.rstrip(".").strip()
    if _THOUSANDS.match(s):
        s = s.replace("{,}", "").replace(",", "")
    return s


def normalize(answer: str) -> str:
    """A light canonical form for the exact-compare fast path (math_verify does the rest)."""
    s = _clean(answer).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "")
    return re.sub(r"\s+|\\[,;:! ]", "", s)


def _decimal(s: str) -> Decimal | None:
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def _keep_outer_alarm() -> Iterator[None]:
    """math_verify arms ``signal.alarm`` and then cancels it with ``alarm(0)``, which also drops
    any alarm the caller had pending (an outer per-problem timeout, pytest-timeout): re-arm it."""
    if not hasattr(signal, "alarm"):  # Windows: math_verify times out with processes instead
        yield
        return
    outer, started = signal.alarm(0), time.monotonic()
    try:
        yield
    finally:
        if outer:
            signal.alarm(max(1, round(outer - (time.monotonic() - started))))


def answers_match(pred: str, gold: str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """Whether an extracted answer equals the gold answer.

    Exact normalized compare, then exact decimal compare when both are plain numbers (decisive:
    this is the toy format's fallback and avoids sympy for most GSM8K/AIME answers), then
    math_verify with ``timeout_s`` per parse/compare in the main thread and none elsewhere."""
    p, g = normalize(pred), normalize(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    dp, dg = _decimal(p), _decimal(g)
    if dp is not None and dg is not None:
        return dp == dg

    from math_verify import parse, verify  # imports sympy (~1 s), so only when the cheap compares cannot decide

    # signal.alarm takes whole seconds, and only works in the main thread.
    timed = timeout_s is not None and timeout_s > 0 and _in_main_thread()
    seconds = max(1, math.ceil(timeout_s)) if timed else None
    with _keep_outer_alarm() if timed else nullcontext():
        gold_parsed = parse(f"${_clean(gold)}$", parsing_timeout=seconds)
        pred_parsed = parse(f"${_clean(pred)}$", parsing_timeout=seconds)
        return bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=seconds))


def grade(response: str, gold: str, *, think_opened: bool = False, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """Whether a model response's final answer equals ``gold``; a response without one is wrong."""
    pred = extract_answer(response, think_opened=think_opened)
    return pred is not None and answers_match(pred, gold, timeout_s=timeout_s)
