"""The artifact store: where stages keep work and publish results.

``open_store(root)`` picks the implementation from the root: a local folder (the default,
``FACTORY_ARTIFACT_ROOT`` or ``.factory``) or ``s3://bucket/prefix`` (the registry issue).
Publishing is atomic: the files first, then ``manifest.json`` (per-file sizes and sha256,
and the folder digest) last, so a reader that finds a manifest finds a whole artifact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pydantic import BaseModel

from model.contract import MANIFEST_NAME, combine_digests, folder_files
from model.fsutil import atomic_write_text

DEFAULT_ROOT = ".factory"
REFS_DIR = "refs"  # <root>/refs/<key>.json: stage results, apart from the artifacts they point to


def artifact_root() -> str:
    return os.environ.get("FACTORY_ARTIFACT_ROOT", DEFAULT_ROOT)


def open_store(root: str | None = None):
    root = root or artifact_root()
    if root.startswith("s3://"):
        raise NotImplementedError("s3:// artifact roots arrive with the registry issue (#6)")
    return LocalStore(root)


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / MANIFEST_NAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


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
        files = folder_files(dest)
        sizes = {name: (dest / name).stat().st_size for name in files}
        manifest = {"digest": combine_digests(files), "files": {n: {"sha256": files[n], "size": sizes[n]} for n in files}}
        atomic_write_text(dest / MANIFEST_NAME, json.dumps(manifest, indent=1))
        return str(dest)

    def published_digest(self, uri: str) -> str | None:
        """The digest recorded when ``uri`` was published, or None if it never was."""
        manifest = read_manifest(Path(uri))
        return manifest["digest"] if manifest else None

    def verify(self, uri: str, digest: str, deep: bool = False) -> bool:
        """Complete and unchanged: manifest present with this digest, every file at its size.

        ``deep`` re-hashes every file (slow for large checkpoints)."""
        folder = Path(uri)
        manifest = read_manifest(folder)
        if manifest is None or manifest["digest"] != digest:
            return False
        for name, info in manifest["files"].items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != info["size"]:
                return False
        return not deep or combine_digests(folder_files(folder)) == digest

    def fetch(self, uri: str) -> Path:
        folder = Path(uri)
        if read_manifest(folder) is None:
            raise FileNotFoundError(f"no published artifact at {uri} (missing {MANIFEST_NAME})")
        return folder

    def write_ref(self, key: str, ref: BaseModel) -> str:
        path = self.path / REFS_DIR / f"{key}.json"
        atomic_write_text(path, ref.model_dump_json(indent=1))
        return str(path)

    def read_ref(self, key: str, cls: type[BaseModel]) -> BaseModel | None:
        path = self.path / REFS_DIR / f"{key}.json"
        if not path.is_file():
            return None
        return cls.model_validate_json(path.read_text())
