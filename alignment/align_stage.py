"""What the two align stages share: their data, their launch and their result.

    sft        run(SFTSpec,        {"model": ModelRef, "data": ArtifactRef}, store, context) -> ModelRef
    preference run(PreferenceSpec, {"model": ModelRef, "data": ArtifactRef}, store, context) -> ModelRef

(``alignment/sft_stage.py`` and ``alignment/preference_stage.py`` are the stage modules.)
``data`` is the SDG stage's ref (``sft.*`` and ``preference.*`` in one folder) or
``dataset_ref(uri)`` of a file or folder given by the recipe. The key is the spec and the
digests of model and data, so a new ``beta`` reruns the preference stage and reuses the SFT.
The Trainer's checkpoints are sealed into the stage's work folder (``alignment/align.py``),
mirrored to the store with an ``s3://`` root, and resumed from after a crash, here or on another
machine. With ``train.num_processes > 1`` the stage launches ``torchrun --standalone
--nproc_per_node=N -m alignment.align_stage LAUNCH``: the Trainer runs DDP in it, rank 0 saves.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from model.contract import (
    CHECKPOINTS_DIR,
    EXTERNAL,
    MODEL_DIR,
    ArchSummary,
    ArtifactRef,
    ArtifactStore,
    Lineage,
    ModelRef,
    Output,
    StageContext,
    lineage,
    local_folder,
    produce,
    stage_key,
)

DATA_NAMES = {"sft": ("sft",), "preference": ("preference",)}  # the data file each method reads in a folder


def dataset_ref(uri: str, store: ArtifactStore) -> ArtifactRef:
    """A ref for data a recipe names by path or URI: a local file or folder (its digest: its
    files'), or an artifact the factory published to ``s3://`` (the digest in its manifest)."""
    from model.digests import file_digest, folder_digest

    if uri.startswith("s3://"):
        digest = store.published_digest(uri)
        if digest is None:
            raise FileNotFoundError(f"align: {uri} is not a published artifact (no manifest.json): publish the data "
                                    "with the factory (an SDG output), or download it and name the local copy")
    else:
        path = Path(uri).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"align: no data at {path}")
        uri, digest = str(path), (folder_digest(path) if path.is_dir() else file_digest(path))
    return ArtifactRef(uri=uri, digest=digest, kind="dataset", lineage=Lineage(stage=EXTERNAL, spec_digest="",
                                                                                code_digest=""))


def key(name: str, module: str, spec, inputs: dict) -> str:
    return stage_key(name, module, spec, inputs)


def run(name: str, module: str, method: str, spec, inputs: dict, store: ArtifactStore,
        context: StageContext) -> ModelRef:
    """Align ``inputs['model']`` on ``inputs['data']`` by ``method`` (``sft`` or ``preference``)."""
    model: ModelRef = inputs["model"]
    data: ArtifactRef = inputs["data"]

    def align(work: Path) -> Output:
        from model import distributed
        from model.architectures import summarize_folder
        from model.train import read_history

        train = spec.train.model_copy(update={"device": context.device.choose(spec.train.device,
                                                                                f"align.{name}.train.device")})
        launch = {"method": method, "spec": spec.model_copy(update={"train": train}).model_dump(mode="json"),
                  "model_dir": str(local_folder(store, model)), "data_path": str(local_folder(store, data)),
                  "work_dir": str(work)}
        with store.mirror_checkpoints(work / CHECKPOINTS_DIR, keep=train.keep_checkpoints):
            distributed.run_training("alignment.align_stage", launch, train.num_processes, work, align_and_save,
                                     context.training_callbacks(train.steps))
        out = work / MODEL_DIR
        return Output(out, {"architecture": ArchSummary(**summarize_folder(out)), "metrics": read_history(out)["metrics"]})

    return produce(ModelRef, store, key(name, module, spec, inputs), lineage(name, module, spec, inputs, context),
                   align, label=context.recipe_name)


def split_rows(launch: dict) -> tuple[list[dict], list[dict]]:
    """The launch's data as (training rows, held-out rows): the same split in every process."""
    from alignment.data import held_out_split, read_rows
    from alignment.spec import PreferenceSpec, SFTSpec

    spec = (SFTSpec if launch["method"] == "sft" else PreferenceSpec).model_validate(launch["spec"])
    rows = read_rows(launch["data_path"], DATA_NAMES[launch["method"]])
    if not rows:
        raise ValueError(f"align: {launch['data_path']} has no rows")
    return held_out_split(rows, spec.held_out_fraction, spec.train.seed)


def align_and_save(launch: dict, callbacks: tuple = ()) -> None:
    """Train and save (rank 0) what a launch record describes; runs in every process."""
    from alignment.align import optimize_preferences, supervised_finetune
    from alignment.spec import PreferenceSpec, SFTSpec

    rows, held_out = split_rows(launch)
    model_dir, work_dir = Path(launch["model_dir"]), Path(launch["work_dir"])
    if launch["method"] == "sft":
        supervised_finetune(model_dir, rows, held_out, SFTSpec.model_validate(launch["spec"]), work_dir, callbacks)
    else:
        optimize_preferences(model_dir, rows, held_out, PreferenceSpec.model_validate(launch["spec"]), work_dir,
                             callbacks)


if __name__ == "__main__":  # a torchrun worker; the Trainer (accelerate) set up its process group
    import torch.distributed as dist

    from model import distributed

    launch = json.loads(Path(sys.argv[1]).read_text())
    align_and_save(launch, distributed.step_recorder(launch))
    if dist.is_initialized():
        dist.destroy_process_group()
