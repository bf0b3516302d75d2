"""GGUF -> HF safetensors folder, through transformers' GGUF reader (needs the ``convert`` extra).

Quantized GGUF tensors (e.g. Q4_1) are dequantized to float32 by transformers + ``gguf``;
the result is an ordinary HF folder that :func:`dami_jax.load_checkpoint` reads.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dami_jax.errors import MissingExtraError

CONVERT_EXTRA = ("torch", "gguf")  # what transformers' GGUF reader needs beyond the base install


def check_convert_extra() -> None:
    """Raise :class:`MissingExtraError` (naming the pip command) unless GGUF conversion can run."""
    missing = [name for name in CONVERT_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(
            f"converting a GGUF file needs {' and '.join(missing)}: pip install 'dami-jax[convert]'"
        )


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Write ``config.json``, ``model.safetensors`` and tokenizer files to ``out_dir`` (atomically)."""
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} does not exist")
    check_convert_extra()
    folder, name = str(gguf_file.parent), gguf_file.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The loaded model is flagged as GGUF-quantized and refuses to save: rebuild it as a plain model.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
