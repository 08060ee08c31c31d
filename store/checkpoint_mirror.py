"""Training checkpoints kept in the artifact store, so a stage resumes on another machine.

    with store.mirror_checkpoints(work / "checkpoints", keep=train.keep_checkpoints):
        run the training (in this process or in torchrun workers)

On entry, a machine whose disk holds no checkpoint (or an older one than the store) downloads
the store's newest published checkpoint, so the training loop finds it and resumes
(``model/checkpoint.py: find_latest``). While the body runs, a background thread watches the
folder: each checkpoint the loop seals (its ``COMPLETE`` marker written) is published to
``<root>/<stage>/<run>/checkpoints/step_NNNNNNNN/`` with the marker's hashes, manifest last
(``S3Store.publish``), and the store keeps the newest ``keep``. On a normal exit the newest
checkpoint is published before returning.

The training loop knows nothing of this: it writes checkpoints to its local folder as always,
and the watcher runs beside it (in the stage's process, while torchrun workers train in their
own), so an upload costs a training step only the CPU and disk bandwidth it shares
(``bench/checkpoint_upload.py`` measures it). A checkpoint is published from hard links to its
files: the loop may delete it (``keep``) while it uploads. A newer checkpoint sealed during an
upload replaces any older one waiting; an upload that fails is retried with the next, and is
never a reason to stop training.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from model.checkpoint import MARKER_FILE, list_checkpoints

POLL_SECONDS = 1.0
RETRY_SECONDS = 30.0  # after a failed upload, before trying the same checkpoint again
_SNAPSHOTS = ".publishing"  # hard-linked copies of checkpoints being uploaded, inside the checkpoint folder


def _say(message: str) -> None:
    print(f"checkpoint mirror: {message}", file=sys.stderr, flush=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def _sealed(folder: Path) -> dict | None:
    """The COMPLETE marker's files (name -> size, sha256) when ``folder`` is a sealed checkpoint."""
    try:
        return json.loads((folder / MARKER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


class CheckpointMirror:
    """See the module docstring. ``store`` is an ``S3Store``, ``key`` where ``local_dir`` publishes."""

    def __init__(self, store, local_dir: Path, key: str, keep: int, poll_seconds: float = POLL_SECONDS):
        self.store, self.local_dir, self.key, self.keep = store, Path(local_dir), key, keep
        self.poll_seconds = poll_seconds
        self.published: str | None = None  # name of the newest checkpoint in the store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.uploads = 0  # checkpoints published by this mirror
        self._failed: tuple[str, float] | None = None  # (checkpoint, when) of the last failed upload

    # ----- the context

    def __enter__(self) -> CheckpointMirror:
        self.restore()
        self._thread = threading.Thread(target=self._watch, name="checkpoint-mirror", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        self._thread.join()  # an upload in flight finishes; none starts after a failure
        if exc_type is None:
            self._publish_newest()

    # ----- restoring

    def restore(self) -> Path | None:
        """Download the store's newest checkpoint when it is newer than every local one; its folder or None."""
        published = self.store.published_under(self.key)
        self.published = published[-1] if published else None
        local = [p.name for p in list_checkpoints(self.local_dir) if _sealed(p) is not None]
        newest = published[-1] if published else None
        if newest is None or (local and local[-1] >= newest):
            return None
        dest = self.local_dir / newest
        shutil.rmtree(dest, ignore_errors=True)  # an unsealed leftover of the same step
        dest.parent.mkdir(parents=True, exist_ok=True)
        uri = self.store.uri(f"{self.key}/{newest}")
        _say(f"no local checkpoint as new as {newest}; downloading it from {uri}")
        self.store.download(uri, dest)
        return dest

    # ----- publishing

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self._publish_newest(retry_after=RETRY_SECONDS)

    def _publish_newest(self, retry_after: float = 0.0) -> None:
        sealed = [p for p in list_checkpoints(self.local_dir) if _sealed(p) is not None]
        if not sealed or (self.published is not None and sealed[-1].name <= self.published):
            return
        newest = sealed[-1]
        if self._failed and self._failed[0] == newest.name and time.monotonic() - self._failed[1] < retry_after:
            return
        snapshot = self.local_dir / _SNAPSHOTS / newest.name
        shutil.rmtree(snapshot, ignore_errors=True)
        try:
            shutil.copytree(newest, snapshot, copy_function=_link_or_copy)
        except (OSError, shutil.Error):  # deleted by the loop meanwhile: a newer one is sealed
            shutil.rmtree(snapshot, ignore_errors=True)
            return
        try:
            self.store.publish(snapshot, f"{self.key}/{newest.name}", known=_sealed(snapshot), progress=False)
            self.published, self.uploads, self._failed = newest.name, self.uploads + 1, None
            for old in self.store.published_under(self.key)[: -self.keep]:
                self.store.remove(f"{self.key}/{old}")
        except Exception as error:  # noqa: BLE001 - retried later or with the next checkpoint; training goes on
            self._failed = (newest.name, time.monotonic())
            _say(f"publishing {newest.name} to {self.store.uri(self.key)} failed, will retry: {error}")
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)
