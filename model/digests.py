"""Content digests: what the factory compares instead of timestamps or paths.

A folder's digest is the sha256 of its files' names and sha256s (the manifest excluded), so
the same files give the same digest wherever they are stored; a JSON value's digest is the
sha256 of its canonical JSON (keys sorted), so a recipe section digests the same whatever
the key order in the YAML.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel

# The file that describes a published folder rather than belongs to it: never part of its digest.
MANIFEST_NAME = "manifest.json"
_READ_CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    """sha256 of one file's bytes, streamed."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def folder_files(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 for every file under ``folder`` except the manifest."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): file_digest(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }


def combine_digests(files: dict[str, str]) -> str:
    """One digest for a set of named files: order-independent, name-sensitive."""
    sha = hashlib.sha256()
    for name in sorted(files):
        sha.update(f"{name}\0{files[name]}\n".encode())
    return sha.hexdigest()


def folder_digest(folder: Path) -> str:
    return combine_digests(folder_files(folder))


def json_digest(value) -> str:
    """Digest of a JSON-able value (a spec section, a dict of inputs), key-order independent."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
