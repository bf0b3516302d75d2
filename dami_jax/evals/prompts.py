"""Benchmark prompts through the model's own chat template.

Qwen3-2507 conventions: the Instruct model answers directly. The Thinking model's chat template
ends its generation prompt with ``<|im_start|>assistant\\n<think>\\n``: the template, not the model,
opens the think block, and the model writes its reasoning, ``</think>``, then the answer. Nothing
is special-cased here: the template does it. What follows for grading is that the response alone
does not show that a think block was open, so :func:`think_status` looks at the prompt's tail
too, and its ``opened`` is the ``think_opened`` that :func:`dami_jax.evals.grading.grade` takes.
(Qwen3's ``<think>``/``</think>`` are added tokens that are not "special", so they survive
``decode(..., skip_special_tokens=True)``.)

Interpolated checkpoints (DAMI): which template to use is the caller's choice. With the Thinking
template, a model near the Instruct end rarely writes ``</think>`` (Wu et al. report almost none
below lambda 0.4; ``papers/dami.md``), so ``grade(..., think_opened=True)`` counts such responses
as unanswered; grading them with ``think_opened=False`` reads the whole response instead.
:func:`think_status` records which case a response was.
"""

from __future__ import annotations

from typing import Any, Literal

from dami_jax.evals.benchmarks import Problem
from dami_jax.models.tokenizer import THINK_CLOSE, THINK_OPEN, chat_tokens

Style = Literal["boxed", "toy"]

# Qwen's recommended math instruction (Qwen3 model cards, "Best Practices").
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def math_prompt(problem: Problem | str, style: Style = "boxed") -> str:
    """The user message for a problem. ``boxed``: MATH/AIME/AMC/GSM8K style, the question plus
    the ``\\boxed{}`` instruction; ``toy``: the question alone (the toy pair answers with
    ``Answer: <integer>`` by training)."""
    question = problem.question if isinstance(problem, Problem) else problem
    if style == "boxed":
        return f"{question.strip()}\n\n{BOXED_INSTRUCTION}"
    if style == "toy":
        return question
    raise ValueError(f"unknown prompt style {style!r}; known: 'boxed', 'toy'")


def _messages(problem: Problem | str, style: Style, system: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system is not None else []
    return messages + [{"role": "user", "content": math_prompt(problem, style)}]


def prompt_text(
    tokenizer, problem: Problem | str, style: Style = "boxed", *, system: str | None = None, **template_kwargs: Any
) -> str:
    """The templated prompt as text, ending with the assistant turn's opening (for
    :func:`think_status` and for logs)."""
    return tokenizer.apply_chat_template(
        _messages(problem, style, system), tokenize=False, add_generation_prompt=True, **template_kwargs
    )


def prompt_tokens(
    tokenizer, problem: Problem | str, style: Style = "boxed", *, system: str | None = None, **template_kwargs: Any
) -> list[int]:
    """Prompt token ids through the model's chat template (``template_kwargs`` go to it, e.g.
    ``enable_thinking=False`` for hybrid Qwen3 templates)."""
    return chat_tokens(tokenizer, _messages(problem, style, system), **template_kwargs)


def prompt_opens_think(prompt_text_tail: str) -> bool:
    """Whether the prompt leaves a think block open for the model (its last ``<think>`` comes
    after its last ``</think>``). A hybrid template's empty ``<think>\\n\\n</think>`` does not."""
    return prompt_text_tail.rfind(THINK_OPEN) > prompt_text_tail.rfind(THINK_CLOSE)


def template_opens_think(tokenizer) -> bool:
    """Whether ``tokenizer``'s chat template opens a think block in its generation prompt."""
    return prompt_opens_think(prompt_text(tokenizer, "", "toy"))


def think_status(prompt_text_tail: str, response: str) -> tuple[bool, bool]:
    """``(opened, closed)`` for one response: was a think block open during generation (opened by
    the template or by the model), and was the last one closed by the model. Pass the end of the
    templated prompt (e.g. the text after the last user turn) so a question that happens to
    mention ``<think>`` does not count."""
    opened = prompt_opens_think(prompt_text_tail) or THINK_OPEN in response or THINK_CLOSE in response
    closed = opened and response.rfind(THINK_CLOSE) > response.rfind(THINK_OPEN)
    return opened, closed


def thought(response: str) -> str:
    """The reasoning of a response's last closed think block (the text between its ``<think>``,
    or the response start when the template opened it, and ``</think>``); empty if none closed.
    An Instruct-like model under the Thinking template closes the block at once: an empty
    thought, which is why think rates count non-empty thoughts."""
    close = response.rfind(THINK_CLOSE)
    if close < 0:
        return ""
    start = response.rfind(THINK_OPEN, 0, close)
    return response[start + len(THINK_OPEN) if start >= 0 else 0 : close].strip()
