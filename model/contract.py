"""The stage contract: what every stage takes and returns.

Every stage is a plain function ``run_<stage>(spec, inputs, store) -> ModelRef | DataRef``.
A ref is a small JSON record: where the artifact lives, a digest of its files, what it
is, where it came from and how good it is. Stages pass refs, never tensors or models, so
an orchestrator can hash, persist and compare them cheaply.

The artifact store is a protocol here; its implementations (a local folder, S3 through
boto3) live in ``registry/store.py``. ``model/`` never imports ``registry/``: the caller
opens a store and passes it in.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, Field

# Files that describe a folder rather than belong to it: never part of its digest.
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


def code_digest(*modules) -> str:
    """Digest of the source of the modules a stage runs: editing them invalidates its cache."""
    return hashlib.sha256("".join(inspect.getsource(m) for m in modules).encode()).hexdigest()


@dataclass(frozen=True)
class Stage:
    """A stage's identity for caching: its name and the modules whose source is its code.

    ``key`` is the cache key of DESIGN.md: stage, spec digest, input digests, code digest.
    The stage functions and the Prefect tasks that wrap them compute it the same way."""

    name: str
    modules: tuple[str, ...]

    def code(self) -> str:
        return code_digest(*(importlib.import_module(m) for m in self.modules))

    def key(self, spec, inputs: dict) -> str:
        digests = {name: _ref_digest(value) for name, value in sorted(inputs.items())}
        return json_digest({"stage": self.name, "spec": json_digest(spec), "inputs": digests, "code": self.code()})


def _ref_digest(value):
    if isinstance(value, list | tuple):
        return [_ref_digest(v) for v in value]
    return getattr(value, "digest", None) or json_digest(value)


class ArchSummary(BaseModel):
    family: str
    parameters: int
    parameters_by_kind: dict[str, int] = Field(default_factory=dict)
    layer_pattern: str = ""
    config: dict[str, int | float | str] = Field(default_factory=dict)


class Lineage(BaseModel):
    stage: str
    spec_digest: str
    code_digest: str
    parents: list[str] = Field(default_factory=list)  # digests of the input refs
    recipe_name: str = ""


class ModelRef(BaseModel):
    """A checkpoint folder (``save_pretrained`` + tokenizer) somewhere in the artifact store."""

    uri: str
    digest: str
    architecture: ArchSummary
    lineage: Lineage
    metrics: dict[str, float] = Field(default_factory=dict)


class DataRef(BaseModel):
    """Tokenized, packed token shards plus the tokenizer that produced them."""

    uri: str
    digest: str
    tokenizer_uri: str
    tokenizer_digest: str
    source: str
    source_digest: str
    seq_len: int
    train_tokens: int
    validation_tokens: int
    lineage: Lineage


class ArtifactRef(BaseModel):
    """Any other stage output kept as files: importance scores, a search report."""

    uri: str
    digest: str
    kind: str
    lineage: Lineage
    metadata: dict = Field(default_factory=dict)


def stored_ref(store, key: str, cls: type[BaseModel]):
    """The ref stored at ``key`` if its artifact is still whole, else None: a stage's cache hit."""
    ref = store.read_ref(key, cls)
    return ref if ref is not None and store.verify(ref.uri, ref.digest) else None


class ArtifactStore(Protocol):
    """Where stages keep their work and publish their results (see registry/store.py)."""

    root: str

    def stage_dir(self, stage: str, name: str) -> Path:
        """A local working folder for one stage run; it survives a crash, so checkpoints go here."""

    def publish(self, local_dir: Path, key: str) -> str:
        """Make ``local_dir`` readable at ``key``, atomically (manifest last); returns its URI."""

    def published_digest(self, uri: str) -> str | None:
        """The digest recorded in the artifact's manifest, or None if it was never published."""

    def verify(self, uri: str, digest: str) -> bool:
        """True when the artifact at ``uri`` is complete and its files match ``digest``."""

    def fetch(self, uri: str) -> Path:
        """A local folder with the artifact's files (downloaded if remote)."""

    def write_ref(self, key: str, ref: BaseModel) -> str: ...

    def read_ref(self, key: str, cls: type[BaseModel]) -> BaseModel | None: ...
