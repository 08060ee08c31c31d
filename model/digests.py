"""Content digests: what the factory compares instead of timestamps or paths.

A folder's digest is the sha256 of its files' names and sha256s, so the same files give the
same digest wherever they are stored; a JSON value's digest is the sha256 of its canonical
JSON (keys sorted), so a recipe section digests the same whatever the key order in the YAML.

A folder's digest is its identity: it decides every downstream cache key and the registry's
idempotency. It covers what determines the artifact (a checkpoint's weights, config,
tokenizer, generation config) and leaves out the manifest and anything under
``measurements/``: wall-clock figures such as a training run's tokens/s or a search's decode
speeds, which differ between two runs that compute the same thing (a run killed three times
and resumed makes bit-identical weights, and must get the same digest as a clean one). The
manifest still lists every file with its sha256, so measurements are checked on download.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel

# The file that describes a published folder rather than belongs to it: never part of its digest.
MANIFEST_NAME = "manifest.json"
# The subfolder of measurements beside an artifact (timings, reports of how it was made): outside its digest.
MEASUREMENTS_DIR = "measurements"
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
    """One digest for a set of named files: order-independent, name-sensitive; files under
    ``measurements/`` are left out (the module docstring says why)."""
    sha = hashlib.sha256()
    for name in sorted(files):
        if name.split("/")[0] == MEASUREMENTS_DIR:
            continue
        sha.update(f"{name}\0{files[name]}\n".encode())
    return sha.hexdigest()


def folder_digest(folder: Path) -> str:
    return combine_digests(folder_files(folder))


PLACEMENT = {"placement": True}  # json_schema_extra of a field that ``identity`` leaves out


def identity(value):
    """A recipe section as JSON without its placement fields (``Field(json_schema_extra=PLACEMENT)``).
    How many processes, which device, how often to checkpoint: these say where and how work runs,
    not what it computes, so they stay out of cache keys, and a run resumed with fewer GPUs, or
    with FSDP instead of DDP, continues the same work (the same folder, the same checkpoints)."""
    if isinstance(value, BaseModel):
        return {name: identity(getattr(value, name)) for name, field in type(value).model_fields.items()
                if not (field.json_schema_extra or {}).get("placement")}
    if isinstance(value, list | tuple):
        return [identity(v) for v in value]
    if isinstance(value, dict):
        return {k: identity(v) for k, v in value.items()}
    return value


def spec_digest(section) -> str:
    """The digest a stage's key and lineage take of its recipe section: its ``identity``."""
    return json_digest(identity(section))


def json_digest(value) -> str:
    """Digest of a JSON-able value (a spec section, a dict of inputs), key-order independent."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
