"""The distill stage: the pruned student retrained from its teacher's logits (``compression/distill.py``).

    run(DistillSpec, {"student": ModelRef, "teacher": ModelRef, "data": DataRef}, store, context) -> ModelRef

Checkpoints go to the stage's work folder (and, with an ``s3://`` root, to the store as they are
written) and an interrupted run resumes from the newest whole one, on this machine or another. With ``train.num_processes > 1`` the stage launches ``torchrun --standalone
--nproc_per_node=N -m compression.distill_stage LAUNCH`` and waits; rank 0 saves.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from compression.spec import DistillSpec
from model.contract import (
    CHECKPOINTS_DIR,
    MODEL_DIR,
    ArchSummary,
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

NAME = "distill"
TAGS = ("gpu",)


def key(spec: DistillSpec, inputs: dict) -> str:
    return stage_key(NAME, __name__, spec, inputs)


def run(spec: DistillSpec, inputs: dict, store: ArtifactStore, context: StageContext) -> ModelRef:
    """Distill ``inputs['student']`` from ``inputs['teacher']`` on ``inputs['data']``."""
    student: ModelRef = inputs["student"]
    teacher: ModelRef = inputs["teacher"]
    data: DataRef = inputs["data"]

    def distill_student(work: Path) -> Output:
        from compression.distill import check_compatible
        from model import distributed
        from model.architectures import summarize_folder
        from model.train import read_history

        student_dir, teacher_dir = local_folder(store, student), local_folder(store, teacher)
        check_compatible(teacher_dir, student_dir)
        train = spec.train.model_copy(update={"device": context.device.choose(spec.train.device,
                                                                                "distill.train.device")})
        launch = {"spec": spec.model_copy(update={"train": train}).model_dump(mode="json"),
                  "student_dir": str(student_dir), "teacher_dir": str(teacher_dir),
                  "data_dir": str(store.fetch(data.uri)), "work_dir": str(work),
                  "description": f"distill {context.recipe_name}"}
        with store.mirror_checkpoints(work / CHECKPOINTS_DIR, keep=train.keep_checkpoints):
            distributed.run_training(__name__, launch, train.num_processes, work,
                                     distill_and_save, context.training_callbacks(train.steps))
        out = work / MODEL_DIR
        return Output(out, {"architecture": ArchSummary(**summarize_folder(out)), "metrics": read_history(out)["metrics"]})

    return produce(ModelRef, store, key(spec, inputs), lineage(NAME, __name__, spec, inputs, context), distill_student,
                   label=context.recipe_name)


def distill_and_save(launch: dict, callbacks: tuple = ()) -> None:
    """Load, distill and save (rank 0) what a launch record describes; runs in every process."""
    import shutil

    import torch

    from compression.distill import block_alignment, distill
    from compression.prune import PRUNING_FILE
    from model.architectures import load_pretrained
    from model.data import PackedTokens
    from model.train import save_trained

    spec = DistillSpec.model_validate(launch["spec"])
    work_dir, student_dir = Path(launch["work_dir"]), Path(launch["student_dir"])
    student, tokenizer = load_pretrained(student_dir, dtype=torch.float32)  # master weights
    teacher, _ = load_pretrained(launch["teacher_dir"])  # as saved; distill() casts it to the inference dtype
    result = distill(student, teacher, PackedTokens(launch["data_dir"], "train"), spec, work_dir,
                     validation=PackedTokens(launch["data_dir"], "validation"),
                     alignment=block_alignment(student_dir), callbacks=callbacks, description=launch["description"])
    if int(os.environ.get("RANK", "0")) == 0:
        out = work_dir / MODEL_DIR
        save_trained(result, out, tokenizer)
        if (student_dir / PRUNING_FILE).is_file():
            shutil.copyfile(student_dir / PRUNING_FILE, out / PRUNING_FILE)


if __name__ == "__main__":  # a torchrun worker
    from model import distributed

    launch = json.loads(Path(sys.argv[1]).read_text())
    distill_and_save(launch, distributed.step_recorder(launch))
    distributed.teardown(distributed.setup("auto"))
