"""Stages of ``compression/`` (the stage contract of model/contract.py).

    run_importance(spec, {"teacher": ModelRef, "data": DataRef}, store) -> ArtifactRef (scores)
    run_search(spec, {"teacher", "scores", "data"}, store) -> ArtifactRef (report, chosen target)
    run_prune(spec, {"teacher": ModelRef, "scores": ArtifactRef}, store) -> ModelRef
    (distillation: compression/distill.py run_distill)

Scores are computed once per (teacher, calibration data, importance spec) and reused for
every target. A model that did not come from the factory (``factory prune MODEL_DIR``)
enters as an ``external`` ModelRef whose URI is its folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from compression.importance import estimate_importance, load_scores, save_scores
from compression.prune import check_compressible, prune
from compression.specs import ImportanceSpec, PruneTarget, SearchSpec
from model.architectures import get_family, load_pretrained
from model.contract import (
    ArchSummary,
    ArtifactRef,
    DataRef,
    Lineage,
    ModelRef,
    Stage,
    folder_digest,
    json_digest,
    stored_ref,
)
from model.data import PackedTokens
from model.pretrain import MODEL_DIR
from model.specs import Section

EXTERNAL = "external"
IMPORTANCE = Stage("importance", ("compression.importance", "compression.stages"))
SEARCH = Stage("search", ("compression.search", "compression.distill", "compression.prune", "model.cost",
                          "model.train"))
PRUNE = Stage("prune", ("compression.prune", "compression.stages"))
SCORES_FILE = "scores.safetensors"
PRUNING_FILE = "pruning.json"  # in a pruned checkpoint: target, teacher digest, kept layers


class PruneStageSpec(Section):
    name: str
    target: PruneTarget


class SearchStageSpec(Section):
    name: str
    search: SearchSpec


def external_model_ref(folder: str | Path) -> ModelRef:
    """A ModelRef for a checkpoint folder the factory did not produce (digest of its files)."""
    from transformers import AutoConfig

    folder = Path(folder).resolve()
    config = AutoConfig.from_pretrained(folder)
    summary = get_family(config.model_type).summarize(config)
    return ModelRef(uri=str(folder), digest=folder_digest(folder), architecture=ArchSummary(**summary),
                    lineage=Lineage(stage=EXTERNAL, spec_digest="", code_digest=""))


def model_folder(store, ref: ModelRef) -> Path:
    return Path(ref.uri) if ref.lineage.stage == EXTERNAL else store.fetch(ref.uri)


def run_importance(spec: ImportanceSpec, inputs: dict, store, recipe_name: str = "") -> ArtifactRef:
    teacher: ModelRef = inputs["teacher"]
    data: DataRef = inputs["data"]
    key = IMPORTANCE.key(spec, inputs)
    ref_key = f"importance/{recipe_name or 'model'}-{teacher.digest[:8]}-{key[:8]}"
    if (cached := stored_ref(store, ref_key, ArtifactRef)) is not None:
        return cached

    from transformers import AutoConfig

    check_compressible(AutoConfig.from_pretrained(model_folder(store, teacher)))
    net, _ = load_pretrained(model_folder(store, teacher), dtype=torch.float32)
    scores = estimate_importance(net, PackedTokens(store.fetch(data.uri), "train"), spec)
    work = store.stage_dir("importance", ref_key.split("/", 1)[1])
    metadata = {"teacher_digest": teacher.digest, "data_digest": data.digest, "spec": spec.model_dump(mode="json")}
    save_scores(scores, work / SCORES_FILE, metadata)
    uri = store.publish(work, ref_key)
    ref = ArtifactRef(uri=uri, digest=store.published_digest(uri), kind="importance_scores", metadata=metadata,
                      lineage=Lineage(stage="importance", spec_digest=json_digest(spec), code_digest=IMPORTANCE.code(),
                                      parents=[teacher.digest, data.digest], recipe_name=recipe_name))
    store.write_ref(ref_key, ref)
    return ref


def prune_checkpoint(teacher_dir: Path, out_dir: Path, scores, target: PruneTarget, provenance: dict) -> dict:
    """Prune a checkpoint folder into ``out_dir`` (config, safetensors, tokenizer, pruning.json).

    Returns the student's architecture summary."""
    net, tokenizer = load_pretrained(teacher_dir, dtype=torch.float32)
    student, plan = prune(net, scores, target)
    out_dir.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    summary = get_family(student.config.model_type).summarize(student.config)
    record = provenance | {"target": target.model_dump(mode="json", exclude_none=True),
                           "kept_layers": plan.layers,
                           "teacher_parameters": sum(p.numel() for p in net.parameters()),
                           "student_parameters": summary["parameters"]}
    (out_dir / PRUNING_FILE).write_text(json.dumps(record, indent=1))
    return summary


def run_prune(spec: PruneStageSpec, inputs: dict, store) -> ModelRef:
    teacher: ModelRef = inputs["teacher"]
    scores_ref: ArtifactRef = inputs["scores"]
    key = PRUNE.key(spec, inputs)
    ref_key = f"prune/{spec.name}-{teacher.digest[:8]}-{key[:8]}"
    if (cached := stored_ref(store, ref_key, ModelRef)) is not None:
        return cached

    scores, _ = load_scores(store.fetch(scores_ref.uri) / SCORES_FILE)
    work = store.stage_dir("prune", ref_key.split("/", 1)[1])
    shutil.rmtree(work / MODEL_DIR, ignore_errors=True)
    summary = prune_checkpoint(model_folder(store, teacher), work / MODEL_DIR, scores, spec.target,
                               {"teacher_digest": teacher.digest, "scores_digest": scores_ref.digest})
    uri = store.publish(work / MODEL_DIR, f"{ref_key}/{MODEL_DIR}")
    ref = ModelRef(uri=uri, digest=store.published_digest(uri), architecture=ArchSummary(**summary),
                   lineage=Lineage(stage="prune", spec_digest=json_digest(spec), code_digest=PRUNE.code(),
                                   parents=[teacher.digest, scores_ref.digest], recipe_name=spec.name))
    store.write_ref(ref_key, ref)
    return ref


def run_search(spec: SearchStageSpec, inputs: dict, store) -> ArtifactRef:
    """The MiniPuzzle search from saved scores; the report's ``chosen.target`` feeds run_prune."""
    from compression.search import search, write_report

    teacher: ModelRef = inputs["teacher"]
    scores_ref: ArtifactRef = inputs["scores"]
    data: DataRef = inputs["data"]
    key = SEARCH.key(spec, inputs)
    ref_key = f"search/{spec.name}-{teacher.digest[:8]}-{key[:8]}"
    if (cached := stored_ref(store, ref_key, ArtifactRef)) is not None:
        return cached

    scores, _ = load_scores(store.fetch(scores_ref.uri) / SCORES_FILE)
    net, _ = load_pretrained(model_folder(store, teacher), dtype=torch.float32)
    work = store.stage_dir("search", ref_key.split("/", 1)[1])
    data_dir = store.fetch(data.uri)
    report = search(net, scores, PackedTokens(data_dir, "train"), PackedTokens(data_dir, "validation"), spec.search,
                    work / "candidates")
    write_report(report, work / "report")
    uri = store.publish(work / "report", f"{ref_key}/report")
    ref = ArtifactRef(uri=uri, digest=store.published_digest(uri), kind="search_report",
                      metadata={"chosen_target": report["chosen"]["target"]},
                      lineage=Lineage(stage="search", spec_digest=json_digest(spec), code_digest=SEARCH.code(),
                                      parents=[teacher.digest, scores_ref.digest, data.digest], recipe_name=spec.name))
    store.write_ref(ref_key, ref)
    return ref
