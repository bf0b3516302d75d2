"""SmolLM2-135M-Instruct's config, tokenizer and layer profile with random weights, written where
:func:`dami_jax.models.pinned.smollm2_checkpoint` finds the converted checkpoint: for a machine
that cannot receive the pinned GGUF (98 MB; a device-machine call carries at most 64 MiB), so that
the SmolLM2 benchmarks run there unchanged. Decode timing does not depend on the weights' values;
everything that measures quality does, and must never run on a stand-in.

    python scripts/smollm2_standin.py --export DIR    # here: the pinned checkpoint's small files -> DIR
    DAMI_JAX_CACHE=/tmp/cache python scripts/smollm2_standin.py --install DIR
                                                      # there: DIR + random float32 weights -> the cache

``--install`` writes only into a cache named by ``$DAMI_JAX_CACHE`` (a scratch folder, never the
default one that real runs read) and never over a checkpoint that is already there.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

WEIGHTS = "model.safetensors"
NEEDED = ("config.json", "tokenizer.json", "tokenizer_config.json", "layer_profile.json")


def fail(message: str) -> None:
    print(f"smollm2_standin.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def export(out: Path) -> None:
    """Every file of the pinned checkpoint's folder except its weights (it needs a layer profile:
    the device machine cannot make one)."""
    from dami_jax.models.pinned import smollm2_checkpoint

    folder = smollm2_checkpoint()
    if not (folder / "layer_profile.json").is_file():
        fail(f"{folder} has no layer_profile.json yet: run `dami-jax profile-layers smollm2` first")
    out.mkdir(parents=True, exist_ok=True)
    for file in sorted(folder.iterdir()):
        if file.is_file() and file.name != WEIGHTS:
            shutil.copy2(file, out / file.name)
    print(f"{out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


def install(source: Path) -> None:
    import jax
    import numpy as np

    from dami_jax.models.checkpoint import save_hf_checkpoint
    from dami_jax.models.config import read_hf_config
    from dami_jax.models.params import init_params
    from dami_jax.models.pinned import smollm2_folder

    target = smollm2_folder()
    if (target / WEIGHTS).exists():
        fail(f"{target / WEIGHTS} exists already; a stand-in never replaces a checkpoint")
    cfg = read_hf_config(source)
    target.mkdir(parents=True, exist_ok=True)
    for file in sorted(source.iterdir()):
        shutil.copy2(file, target / file.name)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        # save_hf_checkpoint writes its own config.json too: only the weights are taken from it.
        written = save_hf_checkpoint(scratch, cfg, init_params(cfg, jax.random.key(0), np.float32))
        os.replace(written / WEIGHTS, target / WEIGHTS)
    print(f"{target}: SmolLM2-135M's files from {source} with random float32 weights (a stand-in for timing only)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--export", type=Path, metavar="DIR", help="copy the pinned checkpoint's small files to DIR")
    mode.add_argument("--install", type=Path, metavar="DIR", help="DIR's files + random weights into $DAMI_JAX_CACHE")
    args = parser.parse_args()
    if args.export is not None:
        return export(args.export)
    if not os.environ.get("DAMI_JAX_CACHE"):
        fail("--install writes only into a scratch cache: set DAMI_JAX_CACHE")
    missing = [name for name in NEEDED if not (args.install / name).is_file()]
    if missing:
        fail(f"--install {args.install}: missing {', '.join(missing)} (made by --export)")
    install(args.install)


if __name__ == "__main__":
    main()
