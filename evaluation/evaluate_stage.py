"""The evaluate stage: the recipe's teacher and students measured side by side, the report, the gate.

    run(EvaluateSpec, {"teacher": ModelRef (optional), "models": [ModelRef, ...], "data": DataRef (optional)},
        store, context) -> Evaluation

Each model's measured result is kept as a record keyed by (model digest, teacher digest, data
digest, the measured sections of the spec, code), so re-running a recipe measures nothing
again, adding a student measures only that student, and changing a gate threshold re-measures
nothing: only the report and the gate are made again.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from evaluation.gate import GateResult
from evaluation.spec import EvaluateSpec
from model.contract import (
    MODEL_DIR,
    ArtifactStore,
    DataRef,
    ModelRef,
    Output,
    Ref,
    StageContext,
    Summary,
    code_version,
    lineage,
    local_folder,
    produce,
    stage_key,
)
from model.digests import json_digest

NAME = "evaluate"
TEACHER = "teacher"  # the teacher's label in an evaluation
REPORT_DIR = "report"  # metrics.json, report.md, plots/


class Evaluation(Ref):
    """The published report folder, headline metrics per model and the gate per candidate."""

    teacher: str | None = None  # its label
    models: dict[str, str] = Field(default_factory=dict)  # label -> checkpoint digest
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict)  # label -> headline scalars
    gates: dict[str, GateResult] = Field(default_factory=dict)  # candidate label -> gate result

    @property
    def passed(self) -> list[str]:
        """Candidates that pass the gate."""
        return [label for label, gate in self.gates.items() if gate.passed]

    def label_of(self, digest: str) -> str | None:
        """The label of the model with this checkpoint digest (None when it was not evaluated)."""
        return next((label for label, d in self.models.items() if d == digest), None)

    def gate_of(self, digest: str) -> GateResult | None:
        """The gate of the candidate with this checkpoint digest (None for the teacher or an unknown model)."""
        label = self.label_of(digest)
        return self.gates.get(label) if label is not None else None


class ModelResult(BaseModel):
    """One model's measured result, kept so a re-run measures nothing."""

    model_digest: str
    label: str
    result: dict


def model_label(ref: ModelRef) -> str:
    """A readable name for a checkpoint: its stage folder (``.../distill/tiny-ab12/model`` -> ``tiny-ab12``)."""
    path = Path(ref.uri.rstrip("/"))
    return path.parent.name if path.name == MODEL_DIR else path.name


def labelled(inputs: dict) -> list[tuple[str, ModelRef]]:
    """(label, ref) for the teacher and every candidate; duplicate labels get their position appended."""
    candidates = inputs.get("models") or []
    candidates = [candidates] if isinstance(candidates, ModelRef) else list(candidates)
    teacher: ModelRef | None = inputs.get("teacher")
    if not candidates and teacher is None:
        raise ValueError("evaluate needs inputs['models'] (a ModelRef or a list) and/or inputs['teacher']")
    refs = ([(TEACHER, teacher)] if teacher else []) + [(model_label(r), r) for r in candidates]
    labels = [label for label, _ in refs]
    if len(set(labels)) != len(labels):
        refs = [(f"{label}-{i}" if labels.count(label) > 1 else label, r) for i, (label, r) in enumerate(refs)]
    return refs


def key(spec: EvaluateSpec, inputs: dict) -> str:
    return stage_key(NAME, __name__, spec, inputs)


def run(spec: EvaluateSpec, inputs: dict, store: ArtifactStore, context: StageContext) -> Evaluation:
    """Evaluate ``inputs['models']`` against ``inputs['teacher']`` (optional) on the validation
    split of ``inputs['data']`` (optional); publish the report, return metrics and gates."""
    refs = labelled(inputs)
    teacher_ref: ModelRef | None = inputs.get("teacher")
    data_ref: DataRef | None = inputs.get("data")

    def measure(work: Path) -> Output:
        from evaluation.evaluate import evaluate_folders

        # What a model's measurement depends on: not the gate, which is applied afresh every time.
        measured = json_digest([spec.model_dump(mode="json", exclude={"gate"}), code_version(__name__)])
        data_digest = data_ref.digest if data_ref else ""
        teacher_digest = teacher_ref.digest if teacher_ref else ""

        def record_key(label: str, ref: ModelRef) -> str:
            parts = [ref.digest, data_digest, teacher_digest if label != TEACHER else "", measured]
            return f"{NAME}/models/{json_digest(parts)[:24]}"

        by_label = dict(refs)
        cached = {label: hit.result for label, ref in refs
                  if (hit := store.read_ref(record_key(label, ref), ModelResult)) is not None}

        def keep(label: str, result: dict) -> None:
            ref = by_label[label]
            store.write_ref(record_key(label, ref), ModelResult(model_digest=ref.digest, label=label, result=result))

        results = evaluate_folders({label: local_folder(store, r) for label, r in refs}, spec, work / REPORT_DIR,
                                   TEACHER if teacher_ref else None, store.fetch(data_ref.uri) if data_ref else None,
                                   cached, keep, context.device)
        return Output(work / REPORT_DIR, {"teacher": results.teacher, "metrics": results.metrics,
                                          "gates": results.gates, "models": {label: r.digest for label, r in refs}})

    return produce(Evaluation, store, key(spec, inputs), lineage(NAME, __name__, spec, inputs, context), measure,
                   label=context.recipe_name)


def summary(ref: Evaluation, store: ArtifactStore) -> Summary:
    """The report as the Prefect UI's markdown; metrics per model and the report's files in MLflow."""
    folder = store.fetch(ref.uri)
    report = folder / "report.md"
    return Summary(markdown=report.read_text() if report.is_file() else str(ref.metrics),
                   metrics={f"{label}/{k}": v for label, metrics in ref.metrics.items() for k, v in metrics.items()},
                   files=[str(p) for p in sorted(folder.rglob("*")) if p.is_file()])
