"""Tokenizers and chat templates through ``transformers.AutoTokenizer`` (local folders only).

Reasoning models (Qwen3-2507 Thinking and the toy pair) write their reasoning between the
``THINK_OPEN`` and ``THINK_CLOSE`` tags; these are added tokens that are not "special", so they
survive ``decode(..., skip_special_tokens=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from transformers import AutoTokenizer

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
