"""The shipped toy pair: two HF folders inside the package (``toy-pair/``, with its README)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dami_jax.dami.pair import ModelPair, load_pair

PAIR_DIR = Path(__file__).parent / "toy-pair"


def toy_pair_paths() -> tuple[Path, Path]:
    """(instruct, thinking) HF folders of the embedded toy pair."""
    return PAIR_DIR / "instruct", PAIR_DIR / "thinking"


def load_toy_pair(dtype: Any = None) -> ModelPair:
    """The embedded Qwen3-architecture toy pair (3.2 MB each), ready to interpolate."""
    return load_pair(*toy_pair_paths(), dtype=dtype)
