"""The search stage: MiniPuzzle's architecture search under a budget (``compression/search.py``),
from the saved importance scores.

    run(SearchSpec, {"teacher": ModelRef, "scores": ArtifactRef, "data": DataRef}, store, context)
        -> ArtifactRef (kind "search_report"; metadata["chosen_target"] feeds the prune stage)
"""

from __future__ import annotations

import json
from pathlib import Path

from compression import importance_stage
from compression.spec import SearchSpec
from model.contract import (
    CHECKPOINTS_DIR,
    MODEL_DIR,
    ArtifactRef,
    ArtifactStore,
    DataRef,
    ModelRef,
    Output,
    StageContext,
    Summary,
    lineage,
    local_folder,
    produce,
    stage_key,
)

NAME = "search"
TAGS = ("gpu",)
REPORT_DIR = "report"  # choice.json, measurements/{search.json, search.md, search_pareto.png}


def key(spec: SearchSpec, inputs: dict) -> str:
    return stage_key(NAME, __name__, spec, inputs)


def run(spec: SearchSpec, inputs: dict, store: ArtifactStore, context: StageContext) -> ArtifactRef:
    """Every candidate in the space that meets the budget, ranked; the report and the chosen target."""
    teacher: ModelRef = inputs["teacher"]
    data: DataRef = inputs["data"]

    def run_search(work: Path) -> Output:
        from compression.importance import missing_layer_metric
        from compression.search import search, write_report
        from model.architectures import load_pretrained
        from model.data import PackedTokens
        from model.device import inference_dtype

        scores = importance_stage.load(store, inputs["scores"])
        if spec.space.num_layers and (problem := missing_layer_metric(scores, spec.layer_metric)) is not None:
            raise ValueError(f"search.layer_metric: {problem}")  # before loading the teacher
        device = context.device.resolve(spec.short_kd.train.device, "search.short_kd.train.device")
        teacher_dir = local_folder(store, teacher)
        net, tokenizer = load_pretrained(teacher_dir, device=device, dtype=inference_dtype(device))
        data_dir = store.fetch(data.uri)
        short_kd = _launched_short_kd(spec, teacher_dir, tokenizer, data_dir, work / "candidates", device, store,
                                      context)
        report = search(net, scores, PackedTokens(data_dir, "train"), PackedTokens(data_dir, "validation"), spec,
                        work / "candidates", short_kd)
        write_report(report, work / REPORT_DIR)
        return Output(work / REPORT_DIR, {"kind": "search_report",
                                          "metadata": {"chosen_target": report["chosen"]["target"]}})

    return produce(ArtifactRef, store, key(spec, inputs), lineage(NAME, __name__, spec, inputs, context), run_search,
                   label=context.recipe_name)


def _launched_short_kd(spec: SearchSpec, teacher_dir: Path, tokenizer, data_dir: Path, work: Path, device,
                       store: ArtifactStore, context: StageContext):
    """The search's short KD through the distillation stage's own launcher: each finalist is saved,
    distilled by ``compression.distill_stage``'s worker (in this process, or ``num_processes``
    torchrun workers with DDP or FSDP, exactly as the final distillation), and loaded back onto
    ``device`` in its inference dtype to be scored. A candidate whose distillation finished in an
    earlier attempt is loaded, not retrained; one interrupted resumes from its newest checkpoint,
    kept in the store like the final distillation's."""
    from compression import distill_stage
    from model import distributed
    from model.architectures import load_pretrained
    from model.device import inference_dtype
    from model.train import HISTORY_FILE, read_history

    train = spec.short_kd.train.model_copy(update={"device": device.type})
    short_kd_spec = spec.short_kd.model_copy(update={"train": train})

    def short_kd(student, rank: int, description: str):
        folder = work / f"candidate-{rank}"
        trained = folder / MODEL_DIR
        if not (trained / HISTORY_FILE).is_file():  # written last, atomically, by save_trained
            pruned = folder / "pruned"
            student.save_pretrained(pruned)
            tokenizer.save_pretrained(pruned)
            del student  # the worker loads it from disk: no second copy on the device
            launch = {"spec": short_kd_spec.model_dump(mode="json"), "student_dir": str(pruned),
                      "teacher_dir": str(teacher_dir), "data_dir": str(data_dir), "work_dir": str(folder),
                      "description": f"{description} ({context.recipe_name})"}
            with store.mirror_checkpoints(folder / CHECKPOINTS_DIR, keep=train.keep_checkpoints):
                distributed.run_training(distill_stage.__name__, launch, train.num_processes, folder,
                                         distill_stage.distill_and_save)
        net, _ = load_pretrained(trained, device=device, dtype=inference_dtype(device))
        return net, read_history(trained)["metrics"]

    return short_kd


def summary(ref: ArtifactRef, store: ArtifactStore) -> Summary:
    """The candidates as a table (the Prefect UI), the report's files (MLflow)."""
    from compression.search import REPORT_FILES
    from model.digests import MEASUREMENTS_DIR

    folder = store.fetch(ref.uri) / MEASUREMENTS_DIR
    report = json.loads((folder / REPORT_FILES[0]).read_text())
    rows = [{"chosen": c["chosen"], "layers": c["architecture"]["layer_pattern"],
             "hidden": c["architecture"]["hidden_size"], "ffn": c["architecture"]["intermediate_size"],
             "mamba_heads": c["architecture"]["mamba_num_heads"], "parameters": c["parameters"],
             "memory_gib": c["memory_bytes"] / 2**30,
             **{f"{part}_gib": v / 2**30 for part, v in (c.get("memory") or {}).items()},
             "rank": c.get("rank"), "zero_shot_loss": c["zero_shot_loss"],
             "zero_shot_token_accuracy": c.get("zero_shot_token_accuracy"),
             "zero_shot_greedy_agreement": c.get("zero_shot_greedy_agreement"), "kd_loss": c["kd_loss"],
             "decode_tokens_per_s": c["decode_tokens_per_s"]} for c in report["candidates"]]
    return Summary(table=rows, table_description="architecture search candidates",
                   files=[str(p) for p in sorted(folder.iterdir()) if p.is_file()])
