"""The preference stage: DPO (or another of TRL's preference losses) on the SDG ``preference``
pairs (``alignment/align.py``), against a frozen copy of the model it starts from.

    run(PreferenceSpec, {"model": ModelRef, "data": ArtifactRef}, store, context) -> ModelRef

``alignment/align_stage.py`` holds what it shares with the sft stage; its ModelRef's metrics
include the held-out pairs' ``before_``/``after_`` ``rewards/margins``, ``rewards/accuracies``
and ``logps_margin`` (the model's own log-probability preference for the chosen reply).
"""

from __future__ import annotations

from alignment import align_stage
from alignment.spec import PreferenceSpec
from model.contract import ArtifactStore, ModelRef, StageContext

NAME = "preference"
TAGS = ("gpu",)


def key(spec: PreferenceSpec, inputs: dict) -> str:
    return align_stage.key(NAME, __name__, spec, inputs)


def run(spec: PreferenceSpec, inputs: dict, store: ArtifactStore, context: StageContext) -> ModelRef:
    """Optimise ``inputs['model']`` on the preference pairs of ``inputs['data']``."""
    return align_stage.run(NAME, __name__, "preference", spec, inputs, store, context)
