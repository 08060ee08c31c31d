"""What each stage shows in the Prefect UI: a markdown summary, a table, progress and a link to
its MLflow run. Keys are stable per recipe and stage, so the UI keeps a history. What a stage
shows beyond its ref comes from its own ``summary`` (plain data, ``model/contract.py: Summary``).

A summary's markdown may show its own files as images (the evaluation report's charts,
``![pareto](plots/pareto.png)``); the UI would resolve such a link against its own address, so
``show_result`` embeds those files as ``data:image/...`` URIs, which both Prefect UIs render (V1
hands the source to ``<img>`` as it is; V2's markdown renderer allows ``data:image/`` sources).
"""

from __future__ import annotations

import base64
import mimetypes
import re
import time
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from model.architectures import format_parameters
from model.contract import Summary


def artifact_key(recipe_name: str, stage: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{recipe_name}-{stage}".lower()).strip("-")


def show_result(recipe_name: str, stage: str, ref, summary: Summary) -> None:
    """The stage's markdown (its own, with its images embedded, or a summary of the ref) and its
    table, if it has one."""
    markdown = (inline_images(summary.markdown, summary.files)
                or describe_ref(recipe_name, stage, ref, summary.notes))
    create_markdown_artifact(markdown, key=artifact_key(recipe_name, stage), description=f"{stage} result")
    if summary.table:
        create_table_artifact(summary.table, key=artifact_key(recipe_name, f"{stage}-table"),
                              description=summary.table_description or f"{stage} table")


MAX_INLINE_IMAGE_BYTES = 2 * 2**20  # a chart is ~50 KB; the markdown is stored in Prefect's database
_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(\s*([^)\s]+)\s*\)")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # http:, https:, data:, ... (rendered as they are)


def inline_images(markdown: str, files: list[str]) -> str:
    """``markdown`` with each relative image link replaced by a ``data:`` URI of the file among
    ``files`` (local paths) whose path ends with it: ``plots/pareto.png`` is ``<report>/plots/pareto.png``.
    Links with a scheme stay as they are; an image that is not among the files, or is larger than
    MAX_INLINE_IMAGE_BYTES, becomes a line of text naming it instead of a broken image."""
    paths = [Path(f) for f in files]

    def embed(match: re.Match) -> str:
        alt, target = match.groups()
        if _URL.match(target) or target.startswith("/"):
            return match.group(0)
        parts = PurePosixPath(target).parts
        path = next((p for p in paths if p.parts[-len(parts):] == parts and p.is_file()), None)
        mime = mimetypes.guess_type(target)[0] or ""
        if path is None or not mime.startswith("image/"):
            return f"*{alt or 'image'}: `{target}` (not available here)*"
        if (size := path.stat().st_size) > MAX_INLINE_IMAGE_BYTES:
            return f"*{alt or 'image'}: `{path}` ({size / 2**20:.1f} MiB, too large to show here)*"
        return f"![{alt}](data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')})"

    return _IMAGE_LINK.sub(embed, markdown)


def describe_ref(recipe_name: str, stage: str, ref, notes: str = "") -> str:
    lines = [f"## {stage}: {recipe_name}", "", f"- artifact: `{ref.uri}`"]
    if getattr(ref, "digest", None):
        lines.append(f"- digest: `{ref.digest[:16]}`")
    if hasattr(ref, "architecture"):
        a = ref.architecture
        lines.append(f"- {a.family}, {format_parameters(a.parameters)} parameters, layers `{a.layer_pattern}`")
    if getattr(ref, "train_tokens", None):
        lines.append(f"- {ref.train_tokens:,} training / {ref.validation_tokens:,} validation tokens")
    for name, value in (getattr(ref, "metrics", None) or {}).items():
        if isinstance(value, int | float):
            lines.append(f"- {name}: {value:.4g}")
    if notes:
        lines += ["", notes]
    return "\n".join(lines)


def link_tracking_run(recipe_name: str, stage: str, tracking_uri: str, experiment_id: str, run_id: str) -> None:
    """A link to the stage's MLflow run (a note with the run id when MLflow is a local file)."""
    key = artifact_key(recipe_name, f"{stage}-mlflow")
    if tracking_uri.startswith(("http://", "https://")):
        create_link_artifact(f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}", key=key,
                             link_text=f"MLflow run of {stage}")
    else:
        create_markdown_artifact(f"MLflow run `{run_id}` in `{tracking_uri}` (open it with `factory up`)", key=key)


class ProgressArtifact:
    """A Prefect progress artifact, created on the first update, then updated at most every
    ``every_seconds`` and always at 100%.

    Each update is a request the server writes to its database and turns into events; sent every
    training step it cost ~5% of the training throughput beside the server on 2 cores
    (``python bench/train_throughput.py --tracking``). The UI needs no more than a few a minute."""

    def __init__(self, key: str, description: str, every_seconds: float = 10.0):
        self.key, self.description = key, description
        self.artifact_id = None  # created on the first update: stages that report no progress show none
        self.every_seconds, self.last_sent, self.percent = every_seconds, time.monotonic(), 0.0

    def update(self, percent: float) -> None:
        percent = min(percent, 100.0)
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(0.0, key=self.key, description=self.description)
        if percent == self.percent:
            return
        if percent == 100.0 or time.monotonic() - self.last_sent >= self.every_seconds:
            self.last_sent, self.percent = time.monotonic(), percent
            update_progress_artifact(self.artifact_id, percent)

    def finish(self) -> None:
        """100% when anything was reported (a finished stage always reads complete)."""
        if self.artifact_id is not None:
            self.update(100.0)


@contextmanager
def stage_progress(recipe_name: str, stage: str):
    """A progress artifact for a stage; yields the context's ``on_progress`` (a fraction done)."""
    progress = ProgressArtifact(artifact_key(recipe_name, f"{stage}-progress"), f"{stage}: work done (%)")
    yield lambda fraction: progress.update(100.0 * fraction)
    progress.finish()
