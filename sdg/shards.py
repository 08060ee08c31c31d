"""Per-record resume: every generated or scored record is kept under a content hash.

    records/<step>/part-<time>-<pid>.jsonl      one {"key": ..., "value": ...} per line

A step's key for a record is the hash of everything that decides its content (generator
identity, messages, sampling parameters, sample index; see ``record_key``). Before a step
generates anything it loads what its shards hold and asks only for the missing keys; each
result is appended and flushed as soon as it arrives. A run killed at any point loses at
most the records in flight: a torn last line is skipped on load, and every run writes its
own part file, so a new run never appends after a torn line. Loading keeps the first
value of a key, so the output never holds a record twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from model.fsutil import fsync_dir

FSYNC_EVERY_S = 1.0


def record_key(*parts) -> str:
    """sha256 of JSON-able parts, key-order independent: the identity of one record."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


class RecordShards:
    """Append-only JSONL shards of one step, keyed by content hash."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._file = None
        self._synced = 0.0
        self._records: dict[str, object] | None = None

    def load(self) -> dict[str, object]:
        """Every whole record of every part file (first value of a key wins)."""
        if self._records is None:
            records: dict[str, object] = {}
            for path in sorted(self.folder.glob("part-*.jsonl")):
                with open(path, encoding="utf-8") as f:
                    for line in f:
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError:
                            continue  # a line torn by a kill: that record is generated again
                        if isinstance(row, dict) and "key" in row and "value" in row:
                            records.setdefault(row["key"], row["value"])
            self._records = records
        return self._records

    def __contains__(self, key: str) -> bool:
        return key in self.load()

    def get(self, key: str, default=None):
        return self.load().get(key, default)

    def append(self, key: str, value) -> None:
        """Keep one record now: written and flushed before this returns."""
        records = self.load()
        if key in records:
            return
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"part-{time.time_ns()}-{os.getpid()}.jsonl"
            self._file = open(path, "a", encoding="utf-8")
            fsync_dir(self.folder)
        self._file.write(json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n")
        self._file.flush()  # in the OS now: a killed process loses nothing written so far
        if time.monotonic() - self._synced > FSYNC_EVERY_S:  # and on disk within a second (power loss)
            os.fsync(self._file.fileno())
            self._synced = time.monotonic()
        records[key] = value

    def close(self) -> None:
        if self._file is not None:
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


class RecordStore:
    """The shards of every step of one SDG working folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._steps: dict[str, RecordShards] = {}

    def step(self, name: str) -> RecordShards:
        if name not in self._steps:
            self._steps[name] = RecordShards(self.folder / name)
        return self._steps[name]

    def close(self) -> None:
        for shards in self._steps.values():
            shards.close()
