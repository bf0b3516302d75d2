"""The toy task family behind the embedded Instruct/Thinking pair (``dami_jax/toy-pair``).

A problem is a chain of integer operations with a difficulty ``steps`` in 1..6::

    a=37, b=a+9, c=b*2, d=c-8. d=?            (3 steps; answer 84)

Operands are single digits (``+``/``-`` 1..9, ``*`` 2..9) and every value stays in 0..99 (operands
are drawn so that no step leaves that range; no modular wrap-around), so numbers have at most
two digits. One step is easy to do in one shot; six chained steps are not, for a tiny model,
unless it writes the intermediate results down. The two response formats:

- Instruct (System 1) answers directly: ``Answer: 84``.
- Thinking (System 2): the chat template opens the think block (``<think>\\n``, the Qwen3-2507
  Thinking convention), the model writes one line per step, closes the block, then answers::

      b=37+9=46
      c=46*2=92
      d=92-8=84
      </think>
      Answer: 84

The final line is always ``Answer: <integer>``; :func:`extract_answer` takes the last one.

Problems of 2..6 steps are split into train and held-out test by a hash of the question text,
so no such benchmark question (:func:`toy_benchmark`) is ever a training question; the two also
draw from different seed streams. One-step questions are the 1,888 single operations, the
arithmetic facts that every scratchpad line also uses; they belong to both splits.

The tokenizer is character-level (a ``tokenizers`` WordLevel model over single characters plus
ChatML special tokens) and identical, id for id, for both models; only the chat templates differ
(the thinking one appends ``<think>\\n`` to the generation prompt).
"""

from __future__ import annotations

import dataclasses
import re
import string
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

MAX_STEPS = 6
MAX_VALUE = 99
ADD_MAX = 9  # operand range of + and -: 1..ADD_MAX
MUL_MAX = 9  # operand range of *: 2..MUL_MAX
VARIABLES = "abcdefg"  # a holds the start value; steps assign b, c, ...
LEVEL1_QUESTIONS = 1888  # distinct 1-step questions (shared by the train and test splits)
TEST_FRACTION = 10  # from 2 steps on, 1 in TEST_FRACTION questions (by crc32) is held out

# Special tokens (Qwen/ChatML names).
ENDOFTEXT = "<|endoftext|>"  # padding
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # end of turn: the EOS that generation stops on
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
UNK = "<|unk|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, UNK)
THINK_TOKENS = (THINK_OPEN, THINK_CLOSE)  # added tokens, kept by decode(skip_special_tokens=True)
CHARACTERS = "\n " + string.digits + string.ascii_lowercase + string.ascii_uppercase + "=+-*/%^,.;:?!()[]'\"_#<>|"

_ANSWER = re.compile(r"Answer: (-?\d+)")


@dataclasses.dataclass(frozen=True)
class ToyProblem:
    """One chain problem. ``values[i]`` is the value of ``VARIABLES[i]``; ``values[-1]`` the answer."""

    id: str
    question: str
    answer: int
    source: str  # f"toy-{steps}"
    steps: int
    values: tuple[int, ...]  # start value, then each step's result (the intermediate results)
    ops: tuple[tuple[str, int], ...]  # (operator, operand) per step

    @property
    def intermediates(self) -> tuple[int, ...]:
        """The result of each step (the last one is the answer)."""
        return self.values[1:]


def _step(rng: np.random.Generator, x: int) -> tuple[str, int, int]:
    """A random operation on x whose result stays in 0..MAX_VALUE: (op, operand, result)."""
    choices = []
    if x < MAX_VALUE:
        choices.append("+")
    if x > 0:
        choices.append("-")
    if 1 <= x <= MAX_VALUE // 2:
        choices.append("*")
    op = choices[int(rng.integers(len(choices)))]
    if op == "+":
        k = int(rng.integers(1, min(ADD_MAX, MAX_VALUE - x) + 1))
        return op, k, x + k
    if op == "-":
        k = int(rng.integers(1, min(ADD_MAX, x) + 1))
        return op, k, x - k
    k = int(rng.integers(2, min(MUL_MAX, MAX_VALUE // x) + 1))
    return op, k, x * k


def make_problem(rng: np.random.Generator, steps: int, id: str = "") -> ToyProblem:
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be in 1..{MAX_STEPS}, got {steps}")
    x = int(rng.integers(0, MAX_VALUE + 1))
    values, ops, parts = [x], [], [f"a={x}"]
    for i in range(steps):
        op, k, x = _step(rng, x)
        values.append(x)
        ops.append((op, k))
        parts.append(f"{VARIABLES[i + 1]}={VARIABLES[i]}{op}{k}")
    question = ", ".join(parts) + f". {VARIABLES[steps]}=?"
    return ToyProblem(id, question, x, f"toy-{steps}", steps, tuple(values), tuple(ops))


def split_of(question: str) -> str:
    """'test' for the held-out questions (1 in TEST_FRACTION, by crc32), else 'train'.
    (:func:`problem_stream` applies it from 2 steps on; 1-step questions are in both splits.)"""
    return "test" if zlib.crc32(question.encode()) % TEST_FRACTION == 0 else "train"


_STREAMS = {"train": 0, "test": 1}


def problem_stream(seed: int, split: str = "train", steps: int | Sequence[int] | None = None) -> Iterable[ToyProblem]:
    """An endless, deterministic stream of ``split`` problems. ``steps``: a level, a list of
    levels to draw uniformly from, or None for all of 1..MAX_STEPS."""
    if split not in _STREAMS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    levels = list(range(1, MAX_STEPS + 1)) if steps is None else [steps] if isinstance(steps, int) else list(steps)
    rng = np.random.default_rng([seed, _STREAMS[split]])
    i = 0
    while True:
        level = levels[int(rng.integers(len(levels)))] if len(levels) > 1 else levels[0]
        p = make_problem(rng, level)
        if level == 1 or split_of(p.question) == split:
            yield dataclasses.replace(p, id=f"toy-{split}-{seed}-{i}")
            i += 1


def generate_problems(n: int, seed: int, steps: int | Sequence[int] | None = None, split: str = "train") -> list[ToyProblem]:
    """``n`` problems from :func:`problem_stream` (same seed, same problems)."""
    stream = problem_stream(seed, split, steps)
    return [next(stream) for _ in range(n)]


def toy_benchmark(n_per_level: int, seed: int = 0, levels: Sequence[int] = range(1, MAX_STEPS + 1)) -> list[ToyProblem]:
    """Held-out evaluation set: ``n_per_level`` distinct test-split problems per level, ids
    ``toy-{steps}-{i}``, source ``toy-{steps}``; level by level in order. Level 1 has only
    ``LEVEL1_QUESTIONS`` distinct questions."""
    out = []
    for level in levels:
        seen: set[str] = set()
        stream = problem_stream(seed, "test", level)
        for _ in range(100 * n_per_level + 10_000):
            if len(seen) == n_per_level:
                break
            p = next(stream)
            if p.question not in seen:
                out.append(dataclasses.replace(p, id=f"toy-{level}-{len(seen)}"))
                seen.add(p.question)
        else:
            raise ValueError(f"level {level} has too few distinct questions for n_per_level={n_per_level} (level 1 has {LEVEL1_QUESTIONS})")
    return out


# ---- response formats ------------------------------------------------------------------------


def scratchpad(p: ToyProblem) -> str:
    """One line per step: ``c=49*2=98\\n``."""
    return "".join(
        f"{VARIABLES[i + 1]}={p.values[i]}{op}{k}={p.values[i + 1]}\n" for i, (op, k) in enumerate(p.ops)
    )


def answer_line(answer: int) -> str:
    return f"Answer: {answer}"


def instruct_response(p: ToyProblem) -> str:
    """What the Instruct model writes after its generation prompt (before ``<|im_end|>``)."""
    return answer_line(p.answer)


def thinking_response(p: ToyProblem) -> str:
    """What the Thinking model writes after its generation prompt, which already ends with
    ``<think>\\n`` (before ``<|im_end|>``)."""
    return f"{scratchpad(p)}{THINK_CLOSE}\n{answer_line(p.answer)}"


def completion(p: ToyProblem, think: bool, opened: bool) -> str:
    """The assistant text after a generation prompt, ``<|im_end|>`` included.

    ``opened``: the prompt already ends with ``<think>\\n`` (thinking template). The four
    combinations are what the training script teaches:
    direct + plain -> ``Answer: N``; direct + opened -> ``</think>\\nAnswer: N`` (an empty think
    block, so the Instruct model stays System 1 under the thinking template); think + opened ->
    :func:`thinking_response`; think + plain -> ``<think>\\n`` + :func:`thinking_response`.
    """
    if think:
        body = thinking_response(p) if opened else f"{THINK_OPEN}\n{thinking_response(p)}"
    else:
        body = f"{THINK_CLOSE}\n{answer_line(p.answer)}" if opened else answer_line(p.answer)
    return body + IM_END


def extract_answer(text: str) -> int | None:
    """The integer of the last ``Answer: <integer>`` in ``text``, or None."""
    found = _ANSWER.findall(text)
    return int(found[-1]) if found else None


def is_correct(text: str, answer: int) -> bool:
    return extract_answer(text) == answer


def well_formed(text: str, opened: bool = False) -> bool:
    """True if ``text`` (a completion decoded with special tokens skipped) has exactly one answer
    line, last, and at most one think block, closed before it. ``opened``: the prompt already
    opened the think block (thinking template), so the completion must close it."""
    lines = text.rstrip("\n").split("\n")
    if not _ANSWER.fullmatch(lines[-1]) or text.count("Answer: ") != 1:
        return False
    opens = text.count(THINK_OPEN) + int(opened)
    return opens <= 1 and text.count(THINK_CLOSE) == opens and not (opened and text.count(THINK_OPEN))


# ---- tokenizer and chat templates ------------------------------------------------------------

# ChatML. Earlier assistant turns keep only their text after </think> (Qwen3 convention).
_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set content = message['content'] -%}"
    "{%- if message['role'] == 'assistant' and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)
INSTRUCT_CHAT_TEMPLATE = _TEMPLATE
THINKING_CHAT_TEMPLATE = _TEMPLATE.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'")


def prompt_text(question: str, thinking: bool) -> str:
    """The text the chat template renders for one user turn plus the generation prompt."""
    text = f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n"
    return text + f"{THINK_OPEN}\n" if thinking else text


def vocabulary() -> dict[str, int]:
    """Token -> id: special tokens, think tokens, then one token per character."""
    tokens = [*SPECIAL_TOKENS, *THINK_TOKENS, *CHARACTERS]
    assert len(set(tokens)) == len(tokens)
    return {t: i for i, t in enumerate(tokens)}


def build_tokenizer(thinking: bool):
    """A ``transformers`` fast tokenizer: character-level, ChatML specials, eos ``<|im_end|>``,
    pad ``<|endoftext|>``; the chat template of the Thinking (``thinking=True``) or Instruct model."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocabulary(), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=UNK,
        chat_template=THINKING_CHAT_TEMPLATE if thinking else INSTRUCT_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )


# ---- the shipped pair ------------------------------------------------------------------------

TOY_PAIR_DIR = Path(__file__).parent / "toy-pair"


def toy_pair_paths() -> tuple[Path, Path]:
    """(instruct, thinking) HF folders of the embedded toy pair (see its README.md)."""
    return TOY_PAIR_DIR / "instruct", TOY_PAIR_DIR / "thinking"


# ---- evaluation ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToyResult:
    problem: ToyProblem
    text: str  # decoded completion, special tokens skipped (think tokens kept)
    correct: bool
    num_tokens: int  # generated tokens, the stop token included
    stopped: bool  # ended on an EOS token within the budget
    opened: bool  # the prompt (chat template) opened the think block

    @property
    def well_formed(self) -> bool:
        """Stopped on EOS, with a :func:`well_formed` completion."""
        return self.stopped and well_formed(self.text, self.opened)


def evaluate(params, cfg, tokenizer, problems: Sequence[ToyProblem], *, max_new_tokens: int = 96, batch_size: int | None = None) -> list[ToyResult]:
    """Greedy-decode each problem's chat prompt (the tokenizer's own template) and grade it."""
    from dami_jax.generation import generate
    from dami_jax.tokenizer import chat_tokens

    problems = list(problems)
    prompts = [chat_tokens(tokenizer, p.question) for p in problems]
    opened = tokenizer.decode(prompts[0][-2:]) == f"{THINK_OPEN}\n" if prompts else False
    batch_size = batch_size or len(prompts)
    results = []
    for lo in range(0, len(prompts), batch_size):
        out = generate(params, cfg, prompts[lo : lo + batch_size], max_new_tokens=max_new_tokens)
        for p, ids in zip(problems[lo : lo + batch_size], out.token_lists()):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            stopped = bool(ids) and ids[-1] in cfg.eos_token_ids
            results.append(ToyResult(p, text, is_correct(text, p.answer), len(ids), stopped, opened))
    return results


def summarize(results: Sequence[ToyResult]) -> dict[int, dict[str, float]]:
    """Per level: accuracy, mean generated tokens, share well formed, count."""
    table: dict[int, dict[str, float]] = {}
    for level in sorted({r.problem.steps for r in results}):
        rs = [r for r in results if r.problem.steps == level]
        table[level] = {
            "accuracy": float(np.mean([r.correct for r in rs])),
            "tokens": float(np.mean([r.num_tokens for r in rs])),
            "well_formed": float(np.mean([r.well_formed for r in rs])),
            "n": len(rs),
        }
    return table


def diagnostic_sequences(
    tokenizer, n_per_level: int, seed: int = 0, levels: Sequence[int] = range(1, MAX_STEPS + 1)
) -> tuple[list[list[int]], list[list[bool]]]:
    """Teacher-forcing sequences for path diagnostics (loss along lam, representation continuity).

    Each :func:`toy_benchmark` problem's chat prompt, rendered by ``tokenizer``'s template, followed
    by the reference completion for that template: the scratchpad response if the template opens
    the think block (thinking template), else the direct answer; ``<|im_end|>`` included.
    Returns (token ids per sequence, mask per sequence: True where the token is a completion
    token, i.e. a target of the next-token loss).
    """
    from dami_jax.tokenizer import chat_tokens

    sequences, masks = [], []
    for p in toy_benchmark(n_per_level, seed=seed, levels=levels):
        prompt = chat_tokens(tokenizer, p.question)
        opened = tokenizer.decode(prompt[-2:]) == f"{THINK_OPEN}\n"
        reply = tokenizer.encode(completion(p, think=opened, opened=opened), add_special_tokens=False)
        sequences.append(prompt + reply)
        masks.append([False] * len(prompt) + [True] * len(reply))
    return sequences, masks
