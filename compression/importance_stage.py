"""The importance stage: activation importance of every axis of the teacher, from one
calibration pass, saved once and reused by every target and every search candidate.

    run(ImportanceSpec, {"teacher": ModelRef, "data": DataRef}, store, context) -> ArtifactRef
"""

from __future__ import annotations

from pathlib import Path

from compression.spec import ImportanceSpec
from model.contract import (
    ArtifactRef,
    ArtifactStore,
    DataRef,
    ModelRef,
    Output,
    StageContext,
    lineage,
    local_folder,
    produce,
    stage_key,
)

NAME = "importance"
TAGS = ("gpu",)
SCORES_FILE = "scores.safetensors"


def key(spec: ImportanceSpec, inputs: dict) -> str:
    return stage_key(NAME, __name__, spec, inputs)


def run(spec: ImportanceSpec, inputs: dict, store: ArtifactStore, context: StageContext) -> ArtifactRef:
    """Scores of ``inputs['teacher']`` on calibration rows of ``inputs['data']``."""
    teacher: ModelRef = inputs["teacher"]
    data: DataRef = inputs["data"]

    def score(work: Path) -> Output:
        from transformers import AutoConfig

        from compression.importance import estimate_importance, save_scores
        from compression.prune import check_compressible
        from model.architectures import load_pretrained
        from model.data import PackedTokens
        from model.device import inference_dtype

        teacher_dir = local_folder(store, teacher)
        check_compressible(AutoConfig.from_pretrained(teacher_dir))
        device = context.device.resolve()
        net, _ = load_pretrained(teacher_dir, device=device, dtype=inference_dtype(device))
        scores = estimate_importance(net, PackedTokens(store.fetch(data.uri), "train"), spec)
        metadata = {"teacher_digest": teacher.digest, "data_digest": data.digest, "spec": spec.model_dump(mode="json")}
        save_scores(scores, work / SCORES_FILE, metadata)
        return Output(work, {"kind": "importance_scores", "metadata": metadata})

    return produce(ArtifactRef, store, key(spec, inputs), lineage(NAME, __name__, spec, inputs, context), score,
                   label=context.recipe_name)


def load(store: ArtifactStore, ref: ArtifactRef):
    """The scores an importance ref points to (fetched from the store)."""
    from compression.importance import load_scores

    return load_scores(local_folder(store, ref) / SCORES_FILE)[0]
