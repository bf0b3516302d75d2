"""Crash-safe result folders: long jobs append records as they go, resume where they stopped,
and never reuse results made with other settings.

- :class:`JsonlLog`: one JSON record per line; each batch is one ``write`` + ``fsync``, so a crash
  can only leave the *last* line torn (no newline). Reading drops a torn last line; an unreadable
  line anywhere else is an error naming the file and line number. Nothing valid is ever deleted.
- :class:`SharedLog`: a log that the processes of a split job fill at once, each through a part
  of its own; :func:`merge_parts` folds the parts in when all are done.
- :class:`ResultsFolder`: ``settings.json`` holds everything that changes a record (the models'
  content hashes, benchmark, template, sampling, seed, token budget, dtype, ...). Resuming with
  other settings is refused with the differences named; :meth:`ResultsFolder.start_fresh` moves
  the old results aside instead of deleting them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Mapping

from dami_jax.errors import InputError
from dami_jax.files import check_output_folder, read_json, write_atomic

SETTINGS_FILE = "settings.json"
NOT_RECORDED = object()  # a required setting that the stored settings lack (an older format)


class RecordsError(InputError):
    """A results file or folder that cannot be used as asked."""


class StaleResultsError(RecordsError):
    """A results folder made with other settings; ``differences`` maps each setting to (stored, now)."""

    def __init__(self, folder: Path, differences: Mapping[str, tuple[Any, Any]], detail: str | None = None):
        self.folder, self.differences, self.detail = folder, dict(differences), detail
        super().__init__(
            f"{folder} holds results made with other settings ({self.listed}); use another folder, or move them "
            "aside with ResultsFolder(folder).start_fresh()"
        )

    @property
    def listed(self) -> str:
        """'max_new_tokens: 160 stored, 8 now; ...' (or the ``detail`` given instead)."""
        if self.detail is not None:
            return self.detail
        return "; ".join(
            f"{k}: {'none' if old is NOT_RECORDED else json.dumps(old)} stored, {json.dumps(new)} now"
            for k, (old, new) in self.differences.items()
        )


class JsonlLog:
    """An append-only JSONL file of records (dicts). ``repair=False`` reads a file that another
    process may be appending to: a torn last line is skipped, not cut off."""

    def __init__(self, path: str | Path, repair: bool = True):
        self.path, self.repair = Path(path), repair
        self.records: list[dict[str, Any]] = self._read()

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        *lines, tail = data.split(b"\n")
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RecordsError(f"{self.path}:{number}: unreadable record ({e.msg}); repair or delete that line") from None
        if tail.strip():  # the last line has no newline: a complete record, or one torn by a crash
            try:
                records.append(json.loads(tail))
                if self.repair:
                    self._append(b"\n")
            except json.JSONDecodeError:
                if self.repair:
                    with open(self.path, "r+b") as f:
                        f.truncate(len(data) - len(tail))
        return records

    def done(self, key: Callable[[dict[str, Any]], Hashable]) -> set[Hashable]:
        return {key(r) for r in self.records}

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        """Append ``records``; kept in memory as parsed back from their lines, exactly as a rerun reads them."""
        lines = [json.dumps(r, sort_keys=True) + "\n" for r in records]
        if lines:
            self._append("".join(lines).encode())
            self.records.extend(json.loads(line) for line in lines)

    def _append(self, payload: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())


def part_path(path: str | Path, process: int) -> Path:
    """Where process ``process`` of a split job appends its share of ``path``'s records."""
    path = Path(path)
    return path.with_name(f"{path.stem}.process{process}{path.suffix}")


def part_paths(path: str | Path) -> list[Path]:
    """Every process's part of ``path`` that is on disk."""
    path = Path(path)
    return sorted(path.parent.glob(f"{path.stem}.process*{path.suffix}"))


class SharedLog(JsonlLog):
    """A log that several processes fill at once (a split sweep): each appends to a part of its own
    (:func:`part_path`), so that no two processes write one file; ``records`` are the log's and
    every part's, so that a rerun with any number of processes skips what any of them finished.
    :func:`merge_parts` folds the parts into the log once every process is done."""

    def __init__(self, path: str | Path, process: int):
        main = Path(path)
        super().__init__(part_path(main, process))
        others = [main, *(p for p in part_paths(main) if p != self.path)]
        self.records = [r for other in others for r in JsonlLog(other, repair=False).records] + self.records


def merge_parts(path: str | Path, key: Callable[[dict[str, Any]], Hashable]) -> list[dict[str, Any]]:
    """Fold every part of ``path`` into it (one atomic write, one record per key), then delete the
    parts; returns the merged records. A crash in between loses nothing: the parts' records are in
    the log, and the next merge drops them as repeats."""
    path, parts = Path(path), part_paths(path)
    if not parts:
        return JsonlLog(path).records
    records, seen = [], set()
    for source in [path, *parts]:
        for record in JsonlLog(source).records:
            if key(record) not in seen:
                seen.add(key(record))
                records.append(record)
    write_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    for part in parts:
        part.unlink()
    return records


class ResultsFolder:
    """A folder of resumable results and the settings they were made with (checked on creation:
    it is a folder or can become one; nothing is created until results are written)."""

    def __init__(self, path: str | Path):
        self.path = check_output_folder(path, "results folder")

    def log(self, name: str) -> JsonlLog:
        return JsonlLog(self.path / name)

    def stored_settings(self) -> dict[str, Any] | None:
        return read_json(self.path / SETTINGS_FILE)

    def check(self, settings: Mapping[str, Any], required: Iterable[str] = ()) -> None:
        """Raise :class:`StaleResultsError` if the folder holds results made with other values of
        any of ``settings``. A setting the folder has not recorded yet (one that only a part of
        the grid depends on, run for the first time) is not a difference: :meth:`claim` adds it;
        unless it is ``required`` (a format version, say) and the folder holds results: those
        were made before the setting existed."""
        stored = self.stored_settings()
        if stored is None:
            if self._has_results():
                raise StaleResultsError(self.path, {}, f"no {SETTINGS_FILE}: an older dami-jax made them, so their settings are unknown")
            return
        now = json.loads(json.dumps(dict(settings)))
        differences = {k: (stored[k], v) for k, v in now.items() if k in stored and stored[k] != v}
        missing = [k for k in required if k not in stored]
        if missing and self._has_results():
            differences.update({k: (NOT_RECORDED, now[k]) for k in missing})
        if differences:
            raise StaleResultsError(self.path, differences)

    def claim(self, settings: Mapping[str, Any], required: Iterable[str] = ()) -> None:
        """:meth:`check`, then record ``settings`` for the next run."""
        self.check(settings, required)
        merged = {**(self.stored_settings() or {}), **json.loads(json.dumps(dict(settings)))}
        write_atomic(self.path / SETTINGS_FILE, json.dumps(merged, indent=1, sort_keys=True) + "\n")

    def start_fresh(self) -> Path | None:
        """Move everything in the folder into a new ``stale-<time>/`` subfolder (nothing is
        deleted); returns it, or None when there was nothing to move."""
        entries = [p for p in self.path.iterdir() if not p.name.startswith("stale-")] if self.path.is_dir() else []
        if not entries:
            return None
        aside = self.path / time.strftime("stale-%Y%m%d-%H%M%S")
        while aside.exists():
            aside = aside.with_name(aside.name + "-1")
        aside.mkdir()
        for entry in entries:
            entry.rename(aside / entry.name)
        return aside

    def _has_results(self) -> bool:
        return self.path.is_dir() and any(p.stat().st_size for p in self.path.glob("*.jsonl"))
