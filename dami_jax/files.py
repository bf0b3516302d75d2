"""Output files and folders: written whole or not at all, and checked before long work starts."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from dami_jax.errors import InputError


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Replace ``path`` with ``data`` in one step (parents are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path


def read_json(path: str | Path) -> Any | None:
    """The JSON document in ``path``, or None when there is no such file; a file that is not valid
    JSON is an InputError naming it (never silently treated as absent)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg})") from None


def check_output_folder(path: str | Path, what: str = "output folder") -> Path:
    """``path`` as a folder results can be written to: it is a folder already, or it can be created
    (its nearest existing ancestor is a writable folder). Creates nothing; raises InputError."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path} is a file, not a folder")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{what} {path} cannot be created: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path} cannot be written: no write permission in {ancestor}")
    return path
