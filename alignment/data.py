"""Rows for the alignment stages: reading the SDG stage's datasets (or anything with its columns)
and a held-out split that does not depend on row order.

Plain functions over plain data: a path in, a list of dicts out. Resolving ``sdg`` (this
recipe's SDG output) or an ``s3://`` URI to a local path is the stage's job, before these.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

DATA_SUFFIXES = (".jsonl", ".parquet")
# Columns the SDG stage writes to Parquet as JSON strings (their shape varies by row): sdg/output.py.
_JSON_COLUMNS = ("meta",)


def read_rows(path: str | Path, preferred_names: Sequence[str] = ()) -> list[dict]:
    """The rows of a ``.jsonl`` or ``.parquet`` file, or of a folder's data file: the first of
    ``preferred_names`` (stems, e.g. ``"preference"``: ``preference.jsonl``, then
    ``preference.parquet``) that exists, else the folder's only data file."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = _data_file(path, preferred_names)
    elif not path.is_file():
        raise FileNotFoundError(f"no data at {path}: neither a file nor a folder")
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    raise ValueError(f"{path} is not a {' / '.join(DATA_SUFFIXES)} file")


def _data_file(folder: Path, preferred_names: Sequence[str]) -> Path:
    for stem in preferred_names:
        for suffix in DATA_SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
    if len(found) == 1:
        return found[0]
    wanted = ", ".join(f"{stem}{suffix}" for stem in preferred_names for suffix in DATA_SUFFIXES)
    looked_for = f"{wanted}, or a single {' / '.join(DATA_SUFFIXES)} file" if wanted \
        else f"a single {' / '.join(DATA_SUFFIXES)} file"
    has = ", ".join(p.name for p in found) if found else "no data file"
    raise FileNotFoundError(f"{folder}: looked for {looked_for}; it has {has}")


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number} is not JSON: {e}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number} is a JSON {type(row).__name__}, not an object (a row)")
            rows.append(row)
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    for row in rows:
        for column in _JSON_COLUMNS:
            if isinstance(row.get(column), str):
                row[column] = json.loads(row[column])
    return rows


def require_columns(rows: Iterable[dict], columns: Sequence[str], source: str | Path) -> None:
    """Every row has every column, not null: else a ValueError naming the column, how many rows
    lack it (the first by number, counting from 1) and ``source`` (the file)."""
    missing: dict[str, list[int]] = {}
    for number, row in enumerate(rows, 1):
        for column in columns:
            if row.get(column) is None:
                missing.setdefault(column, []).append(number)
    if missing:
        problems = "; ".join(f"{column!r} missing or null in {len(numbers)} rows (first: row {numbers[0]})"
                             for column, numbers in missing.items())
        raise ValueError(f"{source}: {problems}")


def row_key(row: dict) -> str:
    """What identifies a row for the split: its ``id``, else its content as canonical JSON."""
    if row.get("id") is not None:
        return f"id:{row['id']}"
    return "json:" + json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)


def held_out_fraction_of(row: dict, seed: int) -> float:
    """A number in [0, 1) from the hash of ``seed`` and the row's key (``row_key``)."""
    digest = hashlib.sha256(f"{seed}\0{row_key(row)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def held_out_split(rows: Sequence[dict], fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held_out): a row is held out when the hash of ``seed`` and its key (``row_key``:
    its ``id``, else its JSON) falls under ``fraction``. Each row's side depends on that row
    alone: not on the order of the rows nor on which others are there (rows added later never
    move a held-out row into training; rows sharing an id stay together). The held-out share is
    ``fraction`` on average, not exactly: a handful of rows may hold out none. Both lists keep
    the input order."""
    if not 0 <= fraction < 1:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    train, held_out = [], []
    for row in rows:
        (held_out if held_out_fraction_of(row, seed) < fraction else train).append(row)
    return train, held_out
