"""The sft stage: supervised fine-tuning on the SDG ``sft`` rows (``alignment/align.py``).

    run(SFTSpec, {"model": ModelRef, "data": ArtifactRef}, store, context) -> ModelRef

``alignment/align_stage.py`` holds what it shares with the preference stage (data, launch,
checkpoints, result); its ModelRef's metrics include ``before_loss`` and ``after_loss``, the
held-out rows' loss on the reply tokens.
"""

from __future__ import annotations

from alignment import align_stage
from alignment.spec import SFTSpec
from model.contract import ArtifactStore, ModelRef, StageContext

NAME = "sft"
TAGS = ("gpu",)


def key(spec: SFTSpec, inputs: dict) -> str:
    return align_stage.key(NAME, __name__, spec, inputs)


def run(spec: SFTSpec, inputs: dict, store: ArtifactStore, context: StageContext) -> ModelRef:
    """Fine-tune ``inputs['model']`` on the conversations of ``inputs['data']``."""
    return align_stage.run(NAME, __name__, "sft", spec, inputs, store, context)
