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
REPORT_DIR = "report"  # search.json, search.md, search_pareto.png


def key(spec: SearchSpec, inputs: dict) -> str:
    return stage_key(NAME, __name__, spec, inputs)


def run(spec: SearchSpec, inputs: dict, store: ArtifactStore, context: StageContext) -> ArtifactRef:
    """Every candidate in the space that meets the budget, ranked; the report and the chosen target."""
    teacher: ModelRef = inputs["teacher"]
    data: DataRef = inputs["data"]

    def run_search(work: Path) -> Output:
        import torch

        from compression.search import search, write_report
        from model.architectures import load_pretrained
        from model.data import PackedTokens

        scores = importance_stage.load(store, inputs["scores"])
        net, _ = load_pretrained(local_folder(store, teacher), dtype=torch.float32)
        data_dir = store.fetch(data.uri)
        report = search(net, scores, PackedTokens(data_dir, "train"), PackedTokens(data_dir, "validation"), spec,
                        work / "candidates")
        write_report(report, work / REPORT_DIR)
        return Output(work / REPORT_DIR, {"kind": "search_report",
                                          "metadata": {"chosen_target": report["chosen"]["target"]}})

    return produce(ArtifactRef, store, key(spec, inputs), lineage(NAME, __name__, spec, inputs, context), run_search,
                   label=context.recipe_name)


def summary(ref: ArtifactRef, store: ArtifactStore) -> Summary:
    """The candidates as a table (the Prefect UI), the report's files (MLflow)."""
    folder = store.fetch(ref.uri)
    report = json.loads((folder / "search.json").read_text())
    rows = [{"chosen": c["chosen"], "layers": c["architecture"]["layer_pattern"],
             "hidden": c["architecture"]["hidden_size"], "ffn": c["architecture"]["intermediate_size"],
             "mamba_heads": c["architecture"]["mamba_num_heads"], "parameters": c["parameters"],
             "zero_shot_loss": c["zero_shot_loss"], "kd_loss": c["kd_loss"],
             "decode_tokens_per_s": c["decode_tokens_per_s"]} for c in report["candidates"]]
    return Summary(table=rows, table_description="architecture search candidates",
                   files=[str(p) for p in sorted(folder.iterdir()) if p.is_file()])
