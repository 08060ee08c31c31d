"""What each stage shows in the Prefect UI: a markdown summary, tables, training progress and
a link to its MLflow run. Keys are stable per recipe and stage, so the UI keeps a history."""

from __future__ import annotations

import re
import time
from contextlib import contextmanager

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from model.architectures import format_parameters


def artifact_key(recipe_name: str, stage: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{recipe_name}-{stage}".lower()).strip("-")


def summarize_ref(recipe_name: str, stage: str, ref, notes: str = "") -> None:
    lines = [f"## {stage}: {recipe_name}", "", f"- artifact: `{ref.uri}`", f"- digest: `{ref.digest[:16]}`"]
    if hasattr(ref, "architecture"):
        a = ref.architecture
        lines.append(f"- {a.family}, {format_parameters(a.parameters)} parameters, layers `{a.layer_pattern}`")
    if getattr(ref, "train_tokens", None):
        lines.append(f"- {ref.train_tokens:,} training / {ref.validation_tokens:,} validation tokens")
    for name, value in (getattr(ref, "metrics", None) or {}).items():
        lines.append(f"- {name}: {value:.4g}")
    if notes:
        lines += ["", notes]
    create_markdown_artifact("\n".join(lines), key=artifact_key(recipe_name, stage), description=f"{stage} result")


def table(recipe_name: str, stage: str, rows: list[dict], description: str) -> None:
    create_table_artifact(rows, key=artifact_key(recipe_name, stage), description=description)


def link_tracking_run(recipe_name: str, stage: str, tracking_uri: str, experiment_id: str, run_id: str) -> None:
    """A link to the stage's MLflow run (a note with the run id when MLflow is a local file)."""
    key = artifact_key(recipe_name, f"{stage}-mlflow")
    if tracking_uri.startswith(("http://", "https://")):
        create_link_artifact(f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}", key=key,
                             link_text=f"MLflow run of {stage}")
    else:
        create_markdown_artifact(f"MLflow run `{run_id}` in `{tracking_uri}` (open it with `factory up`)", key=key)


class ProgressArtifact:
    """A Prefect progress artifact, updated at most every ``every_seconds`` and always at 100%.

    Each update is a request the server writes to its database and turns into events; sent every
    training step it cost ~5% of the training throughput beside the server on 2 cores
    (``python bench/train_throughput.py --tracking``). The UI needs no more than a few a minute."""

    def __init__(self, key: str, description: str, every_seconds: float = 10.0):
        self.artifact_id = create_progress_artifact(0.0, key=key, description=description)
        self.every_seconds, self.last_sent, self.percent = every_seconds, time.monotonic(), 0.0

    def update(self, percent: float) -> None:
        percent = min(percent, 100.0)
        if percent == self.percent:
            return
        if percent == 100.0 or time.monotonic() - self.last_sent >= self.every_seconds:
            self.last_sent, self.percent = time.monotonic(), percent
            update_progress_artifact(self.artifact_id, percent)


@contextmanager
def training_progress(recipe_name: str, stage: str, total_steps: int):
    """A progress artifact for a training stage; yields the training loop's StepCallback."""
    progress = ProgressArtifact(artifact_key(recipe_name, f"{stage}-progress"), f"{stage} steps done (%)")
    yield lambda record: progress.update(100.0 * record["step"] / total_steps)
    progress.update(100.0)
