"""``LocalStore``: artifacts as folders under a local root; URIs are absolute paths."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from pydantic import BaseModel

from model.digests import MANIFEST_NAME
from model.fsutil import atomic_write_text
from store import REFS_DIR
from store.manifest import build_manifest, fetch_local, local_copy_is_whole, published_digest_local


class LocalStore:
    """Artifacts as folders under a local root; URIs are absolute paths."""

    def __init__(self, root: str | Path):
        self.path = Path(root).expanduser().resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        self.root = str(self.path)

    def stage_dir(self, stage: str, name: str) -> Path:
        folder = self.path / stage / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def publish(self, local_dir: Path, key: str) -> str:
        dest = self.path / key
        local_dir = Path(local_dir).resolve()
        if local_dir != dest:
            (dest / MANIFEST_NAME).unlink(missing_ok=True)  # unpublish first: no reader mixes old and new
            staging = dest.with_name(f".{dest.name}.staging-{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(local_dir, staging)
            shutil.rmtree(dest, ignore_errors=True)
            staging.rename(dest)
        atomic_write_text(dest / MANIFEST_NAME, json.dumps(build_manifest(dest), indent=1))
        return str(dest)

    def published_digest(self, uri: str) -> str | None:
        """The digest recorded when ``uri`` was published, or None if it never was."""
        return published_digest_local(uri)

    def verify(self, uri: str, digest: str, deep: bool = False) -> bool:
        """Complete and unchanged: manifest present with this digest, every file at its size.

        ``deep`` re-hashes every file (slow for large checkpoints)."""
        return local_copy_is_whole(Path(uri), digest, deep)

    def fetch(self, uri: str) -> Path:
        return fetch_local(uri)

    def mirror_checkpoints(self, local_dir: Path, keep: int):
        """Nothing to do: a local store's stage folders are in the store, checkpoints included."""
        return contextlib.nullcontext()

    def write_ref(self, key: str, ref: BaseModel) -> str:
        path = self.path / REFS_DIR / f"{key}.json"
        atomic_write_text(path, ref.model_dump_json(indent=1))
        return str(path)

    def read_ref(self, key: str, cls: type[BaseModel]) -> BaseModel | None:
        path = self.path / REFS_DIR / f"{key}.json"
        if not path.is_file():
            return None
        return cls.model_validate_json(path.read_text())


