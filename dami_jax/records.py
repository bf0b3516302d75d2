"""Crash-safe JSONL result logs: long jobs append as they go and resume where they stopped.

Each record is one line written with a single ``write`` + ``fsync``; a line cut short by a
crash is dropped (and truncated away) on the next open, so the file is always a valid prefix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable


class JsonlLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = self._read_valid_prefix()

    def _read_valid_prefix(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records, good_bytes = [], 0
        with open(self.path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break
                good_bytes += len(line)
        if good_bytes != self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(good_bytes)
        return records

    def done(self, key: Callable[[dict[str, Any]], Hashable]) -> set[Hashable]:
        return {key(r) for r in self.records}

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        records = list(records)
        if not records:
            return
        payload = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
        with open(self.path, "ab") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        self.records.extend(records)
