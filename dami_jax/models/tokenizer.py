"""Tokenizers and chat templates through ``transformers.AutoTokenizer`` (local folders only).

Reasoning models (Qwen3-2507 Thinking and the toy pair) write their reasoning between the
``THINK_OPEN`` and ``THINK_CLOSE`` tags; these are added tokens that are not "special", so they
survive ``decode(..., skip_special_tokens=True)``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Sequence


@contextlib.contextmanager
def _no_advice() -> Iterator[None]:
    """transformers announces on import, as advice, that it found no torch: true on the base
    install, and no news for dami-jax, whose models run on jax. Silenced for that import only."""
    name, before = "TRANSFORMERS_NO_ADVISORY_WARNINGS", os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
    os.environ[name] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


with _no_advice():
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401 - imported quietly, for the package

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def load_tokenizer(path: str | Path):
    """The tokenizer saved beside a checkpoint; never touches a hub."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def chat_tokens(tokenizer, messages: str | Sequence[dict[str, str]], **template_kwargs: Any) -> list[int]:
    """A user message (or a message list) -> prompt token ids, through the model's chat template,
    ending with the assistant turn's opening (``add_generation_prompt``)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True, **template_kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


def byte_alphabet() -> dict[int, str]:
    """Byte-level BPE's spelling of bytes (GPT-2's, used by Llama-3, Qwen and SmolLM2 vocabularies):
    every byte 0-255 is one printable character, so a token of any bytes is a plain string. The
    printable Latin-1 bytes spell themselves; the others (controls, space, ...) take the characters
    from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = (b for b in range(256) if b not in printable)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}
