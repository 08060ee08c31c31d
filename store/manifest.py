"""The manifest every published artifact carries, in both stores: ``manifest.json`` written last,

    {"digest": <combined sha256>, "files": {name: {"sha256": ..., "size": ...}}}

so a reader that finds one finds a whole artifact. The digest is ``model/digests.py``'s
``combine_digests`` of the files' sha256: the same digest a ref carries.
"""

from __future__ import annotations

import json
from pathlib import Path

from model.digests import MANIFEST_NAME, combine_digests, file_digest, folder_files


def build_manifest(folder: Path, known: dict[str, dict] | None = None) -> dict:
    """sha256 and size of every file under ``folder`` (except the manifest) and their digest.
    ``known``: name -> {"size", "sha256"} already computed (a checkpoint's COMPLETE marker); a
    file listed there at that size is not read again."""
    folder = Path(folder)
    known = known or {}
    files = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and path.name != MANIFEST_NAME:
            size = path.stat().st_size
            sha = known[name]["sha256"] if known.get(name, {}).get("size") == size else file_digest(path)
            files[name] = {"sha256": sha, "size": size}
    return {"digest": combine_digests({name: info["sha256"] for name, info in files.items()}), "files": files}


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / MANIFEST_NAME).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def local_copy_is_whole(folder: Path, digest: str, deep: bool = False) -> bool:
    """Manifest present with this digest and every file at its size; ``deep`` re-hashes every file."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None or manifest["digest"] != digest:
        return False
    for name, info in manifest["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != info["size"]:
            return False
    return not deep or combine_digests(folder_files(folder)) == digest


def fetch_local(uri: str) -> Path:
    folder = Path(uri)
    if read_manifest(folder) is None:
        raise FileNotFoundError(f"no published artifact at {uri} (missing {MANIFEST_NAME})")
    return folder


def published_digest_local(uri: str) -> str | None:
    manifest = read_manifest(Path(uri))
    return manifest["digest"] if manifest else None

