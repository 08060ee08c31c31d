"""The prune stage: the student, sliced exactly from the teacher to a target (no retraining).

    run(PruneSpec, {"teacher": ModelRef, "scores": ArtifactRef, "search": ArtifactRef (optional)},
        store, context) -> ModelRef

The target is the recipe's ``compress.target`` or, when the recipe searches, the search
report's choice (``inputs['search']``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from compression import importance_stage
from compression.spec import PruneTarget
from model.contract import (
    MODEL_DIR,
    ArchSummary,
    ArtifactStore,
    ModelRef,
    Output,
    StageContext,
    lineage,
    local_folder,
    produce,
    stage_key,
)
from model.spec import Section

NAME = "prune"


class PruneSpec(Section):
    """A fixed target, or none to take the search's choice (``inputs['search']``)."""

    target: PruneTarget | None = None


def key(spec: PruneSpec, inputs: dict) -> str:
    return stage_key(NAME, __name__, spec, inputs)


def resolve_target(spec: PruneSpec, inputs: dict) -> PruneTarget:
    if spec.target is not None:
        return spec.target
    if inputs.get("search") is None:
        raise ValueError("prune: give a target, or a search report as inputs['search']")
    return PruneTarget.model_validate(inputs["search"].metadata["chosen_target"])


def run(spec: PruneSpec, inputs: dict, store: ArtifactStore, context: StageContext) -> ModelRef:
    """``inputs['teacher']`` pruned to the target with the saved ``inputs['scores']``."""
    teacher: ModelRef = inputs["teacher"]
    target = resolve_target(spec, inputs)

    def prune_teacher(work: Path) -> Output:
        from compression.prune import prune_checkpoint

        scores = importance_stage.load(store, inputs["scores"])
        out = work / MODEL_DIR
        shutil.rmtree(out, ignore_errors=True)  # a half-written student from an interrupted run
        summary = prune_checkpoint(local_folder(store, teacher), out, scores, target,
                                   {"teacher_digest": teacher.digest, "scores_digest": inputs["scores"].digest})
        return Output(out, {"architecture": ArchSummary(**summary)})

    return produce(ModelRef, store, key(spec, inputs), lineage(NAME, __name__, spec, inputs, context), prune_teacher,
                   label=context.recipe_name)
