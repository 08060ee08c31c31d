"""The artifact store: where stages keep their work and publish their results.

``open_store(root)`` picks the implementation from the root (``FACTORY_ARTIFACT_ROOT``,
default ``.factory``): a local folder (``store/local.py: LocalStore``) or
``s3://bucket/prefix`` (``store/s3.py: S3Store``, any S3-compatible endpoint through boto3).
Both implement the ``ArtifactStore`` protocol the stages are typed against
(``model/contract.py``); nothing here knows about MLflow or Prefect.

Publishing is atomic for readers: the files first, then ``manifest.json`` last
(``store/manifest.py``: the same format in both stores), so a reader that finds a manifest
finds a whole artifact, and a reader that finds none treats the artifact as not published.

S3 is configured the standard boto3 way and only that way: the credential chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, SSO, instance roles),
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for MinIO, Ceph and friends,
``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE`` for retries. Stages still work in local
folders (``stage_dir``) and read local copies (``fetch``); those live under
``FACTORY_WORK_DIR`` (default ``~/.cache/factory``).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_ROOT = ".factory"
REFS_DIR = "refs"  # <root>/refs/<key>.json: stage results, apart from the artifacts they point to


def artifact_root() -> str:
    return os.environ.get("FACTORY_ARTIFACT_ROOT", DEFAULT_ROOT)


def work_root() -> Path:
    """Local folder for working copies of a remote store: stage folders and downloads."""
    if "FACTORY_WORK_DIR" in os.environ:
        return Path(os.environ["FACTORY_WORK_DIR"]).expanduser().resolve()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser().resolve() / "factory"


def open_store(root: str | None = None):
    """The store at ``root`` (default: ``artifact_root()``); opening one touches no network."""
    root = root or artifact_root()
    if root.startswith("s3://"):
        from store.s3 import S3Store

        return S3Store(root)
    from store.local import LocalStore

    return LocalStore(root)
