"""The reward stage: a reward head trained on a frozen base checkpoint (``alignment/reward.py``).

    run(RewardSpec, {"base": ModelRef, "data": ArtifactRef}, store, context) -> ModelRef

``data`` is the SDG stage's ref (its ``preference.*``) or ``dataset_ref`` of a file or folder
the recipe names. The result is the folder ``sdg/scorers.py: RewardModel`` reads (the base's
files plus ``reward_head.*``): point an sdg section's ``scorer.reward_model`` at its URI. Its
metrics are the held-out pair accuracy (``held_out_accuracy``) beside an untrained head's, and
the training loss; training is seconds once the base has encoded each conversation, so there
are no checkpoints: an interrupted run starts again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from alignment.spec import RewardSpec
from model.contract import (
    MODEL_DIR,
    ArchSummary,
    ArtifactRef,
    ArtifactStore,
    ModelRef,
    Output,
    StageContext,
    lineage,
    local_folder,
    produce,
    stage_key,
)

NAME = "reward"
TAGS = ("gpu",)


def key(spec: RewardSpec, inputs: dict) -> str:
    return stage_key(NAME, __name__, spec, inputs)


def run(spec: RewardSpec, inputs: dict, store: ArtifactStore, context: StageContext) -> ModelRef:
    """Train a reward head on ``inputs['base']`` from the rows of ``inputs['data']``."""
    base: ModelRef = inputs["base"]
    data: ArtifactRef = inputs["data"]

    def train(work: Path) -> Output:
        from alignment.reward import read_rows, train_reward_model
        from model.architectures import summarize_folder

        path = local_folder(store, data)  # a given file or folder as it is; a published artifact fetched
        out = work / MODEL_DIR
        shutil.rmtree(out, ignore_errors=True)  # a crash mid-write: the head is retrained, not patched
        metrics = train_reward_model(local_folder(store, base), read_rows(path), out, spec, source=str(path),
                                     device=context.device.choose("auto", "reward_model.device"))
        return Output(out, {"architecture": ArchSummary(**summarize_folder(out)), "metrics": _numbers(metrics)})

    return produce(ModelRef, store, key(spec, inputs), lineage(NAME, __name__, spec, inputs, context), train,
                   label=context.recipe_name)


def _numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The numeric metrics, per-attribute dicts flattened (``held_out_mse/helpfulness``)."""
    flat = {}
    for name, value in metrics.items():
        if isinstance(value, dict):
            flat |= _numbers(value, f"{prefix}{name}/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}{name}"] = float(value)
    return flat
