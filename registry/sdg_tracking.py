"""An SDG stage's output in MLflow: its datasets with their lineage (plain functions; the
flow calls them inside the stage's nested run).

    with tracking.stage_run(parent_run_id, "sdg") as stage_id:
        ref = sdg_stage.run(recipe.sdg, inputs, store, StageContext(recipe.name))
        log_sdg_output(stage_id, ref, recipe_digest=json_digest(recipe))

MLflow records datasets as run inputs only, so each published file (``sft.parquet``,
``preference.parquet``, or the JSONL twins when Parquet is off) is logged as a dataset
input with context ``sdg_output``: name, URI, file sha256 as digest, rows and columns as
profile, and tags naming what made it (generator, reward model, judge, recipe digest).
The same lineage goes on the run as tags, the counts as metrics, the ref and the step
statistics as JSON artifacts. A later stage that trains on the data logs the same file
as its ``training`` input, so MLflow links producer and consumer by digest.
"""

from __future__ import annotations

import json

from model.contract import ArtifactRef
from registry.secrets import scrub, scrub_text
from registry.tracking import client, log_metrics

OUTPUT_CONTEXT = "sdg_output"


def sdg_lineage(ref: ArtifactRef, recipe_digest: str = "") -> dict[str, str]:
    """What made the datasets: generator, scorers, recipe, spec and code digests."""
    meta = ref.metadata
    tags = {"factory.sdg.digest": ref.digest, "factory.sdg.uri": ref.uri, "factory.sdg.generator": meta.get("generator", ""),
            "factory.sdg.reward_model": meta.get("reward_model", ""), "factory.sdg.judge": meta.get("judge", ""),
            "factory.sdg.spec_digest": ref.lineage.spec_digest, "factory.sdg.code_digest": ref.lineage.code_digest,
            "factory.recipe_digest": recipe_digest, "factory.recipe": ref.lineage.recipe_name}
    return {k: scrub_text(v) for k, v in tags.items() if v}


def _dataset_files(ref: ArtifactRef) -> dict[str, dict]:
    """One file per dataset: the Parquet one when written, else the JSONL one."""
    files = ref.metadata.get("files", {})
    chosen = {}
    for name in ("sft", "preference"):
        for fmt in ("parquet", "jsonl"):
            if f"{name}.{fmt}" in files:
                chosen[f"{name}.{fmt}"] = files[f"{name}.{fmt}"]
                break
    return chosen


def log_sdg_output(run_id: str, ref: ArtifactRef, recipe_digest: str = "") -> None:
    """Log the sdg stage's result on ``run_id``: datasets with lineage, tags, counts, the ref."""
    from mlflow.entities import Dataset, DatasetInput, InputTag, RunTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    lineage = sdg_lineage(ref, recipe_digest)
    stats = ref.metadata.get("stats", {})
    c = client()
    inputs = []
    for file_name, info in _dataset_files(ref).items():
        kind = file_name.split(".")[0]
        uri = f"{ref.uri.rstrip('/')}/{file_name}"
        dataset = Dataset(
            name=scrub_text(f"{ref.lineage.recipe_name or 'sdg'} {kind}")[:500],
            digest=info["sha256"][:32],  # MLflow keeps 36 characters; the full sha256 is the factory.digest tag
            source_type="s3" if uri.startswith("s3://") else "local",
            source=json.dumps({"uri": scrub_text(uri)}),
            profile=json.dumps({"num_rows": info["rows"], "columns": info["columns"],
                                "by_kind": stats.get("prompts_by_kind", {}),
                                "pairs": stats.get("pairs", {}) if kind == "preference" else {}}),
        )
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, OUTPUT_CONTEXT), InputTag("factory.digest", info["sha256"]),
                InputTag("factory.kind", kind)]
        tags += [InputTag(k, v) for k, v in lineage.items() if k != "factory.sdg.uri"]
        inputs.append(DatasetInput(dataset, tags=tags))
    if inputs:
        c.log_inputs(run_id, datasets=inputs)
    c.log_batch(run_id, tags=[RunTag(k, v) for k, v in lineage.items()])
    counts = {"sdg/sft_rows": ref.metadata.get("sft_rows", 0), "sdg/preference_rows": ref.metadata.get("preference_rows", 0),
              "sdg/generated": sum(s.get("generated", 0) for s in stats.values()),
              "sdg/reused": sum(s.get("reused", 0) for s in stats.values())}
    counts |= {f"sdg/pairs_{k}": v for k, v in stats.get("pairs", {}).items()}
    log_metrics(run_id, counts)
    c.log_dict(run_id, scrub(ref.model_dump(mode="json")), "sdg_ref.json")
