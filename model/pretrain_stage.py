"""The pretrain stage: a model trained from scratch on the data stage's shards.

    run(PretrainSpec, {"data": DataRef}, store, context) -> ModelRef

Training checkpoints go to the stage's work folder (and, with an ``s3://`` root, to the store as
they are written) and an interrupted run resumes from the newest whole one (``model/train.py``),
on this machine or another. With ``train.num_processes > 1`` the stage launches
``torchrun --standalone --nproc_per_node=N -m model.pretrain_stage LAUNCH`` and waits; every
worker runs the same loop (DDP or FSDP) and rank 0 saves the checkpoint folder.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

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
    produce,
    stage_key,
)
from model.spec import ModelSpec, Section, TrainSpec

NAME = "pretrain"
TAGS = ("gpu",)


class PretrainSpec(Section):
    """What pretraining reads from a recipe."""

    model: ModelSpec
    train: TrainSpec


def key(spec: PretrainSpec, inputs: dict) -> str:
    return stage_key(NAME, __name__, spec, inputs)


def run(spec: PretrainSpec, inputs: dict, store: ArtifactStore, context: StageContext) -> ModelRef:
    """Pretrain ``spec.model`` on ``inputs['data']``; resumes from the newest checkpoint."""
    from model import distributed
    from model.architectures import build_model_config, format_parameters, get_family
    from model.tokenizer import load_tokenizer
    from model.train import read_history

    data: DataRef = inputs["data"]
    tokenizer_dir = store.fetch(data.tokenizer_uri)
    config = build_model_config(spec.model, load_tokenizer(tokenizer_dir))
    architecture = ArchSummary(**get_family(spec.model.family).summarize(config))

    def pretrain(work: Path) -> Output:
        train = spec.train.model_copy(update={"device": context.device.choose(spec.train.device, "train.device")})
        launch = {"spec": spec.model_copy(update={"train": train}).model_dump(mode="json"),
                  "data_dir": str(store.fetch(data.uri)), "tokenizer_dir": str(tokenizer_dir), "work_dir": str(work),
                  "description": f"pretrain {context.recipe_name}"}
        with store.mirror_checkpoints(work / CHECKPOINTS_DIR, keep=train.keep_checkpoints):
            distributed.run_training(__name__, launch, train.num_processes, work,
                                     train_and_save, context.training_callbacks(train.steps))
        return Output(work / MODEL_DIR, {"architecture": architecture, "metrics": read_history(work / MODEL_DIR)["metrics"]})

    label = f"{context.recipe_name}-{spec.model.family}-{format_parameters(architecture.parameters)}"
    return produce(ModelRef, store, key(spec, inputs), lineage(NAME, __name__, spec, inputs, context), pretrain, label)


def train_and_save(launch: dict, callbacks: tuple = ()) -> None:
    """Build, train and save (rank 0) the model a launch record describes; runs in every process."""
    import torch

    from model.architectures import build_model_config, get_family
    from model.data import PackedTokens
    from model.tokenizer import load_tokenizer
    from model.train import save_trained, train

    spec = PretrainSpec.model_validate(launch["spec"])
    work_dir = Path(launch["work_dir"])
    tokenizer = load_tokenizer(launch["tokenizer_dir"])
    torch.manual_seed(spec.train.seed)
    net = get_family(spec.model.family).model_class(build_model_config(spec.model, tokenizer))
    result = train(net, PackedTokens(launch["data_dir"], "train"), spec.train, work_dir,
                   validation=PackedTokens(launch["data_dir"], "validation"), callbacks=callbacks,
                   description=launch["description"])
    if int(os.environ.get("RANK", "0")) == 0:
        save_trained(result, work_dir / MODEL_DIR, tokenizer)


if __name__ == "__main__":  # a torchrun worker
    from model import distributed

    launch = json.loads(Path(sys.argv[1]).read_text())
    train_and_save(launch, distributed.step_recorder(launch))
    distributed.teardown(distributed.setup("auto"))
