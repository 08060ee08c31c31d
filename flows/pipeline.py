"""The factory's stages called directly, in order, without an orchestrator.

    data -> teacher (pretrain, or the recipe's start_from) -> importance -> search | target
         -> prune -> distill

Each stage returns a ref and skips its work when its result is already stored, so running
this twice computes nothing the second time. The Prefect flows (flows/factory.py) compose
the same stage functions as tasks; this module is what they are measured against, and
what ``factory compress`` / ``factory distill`` run.
"""

from __future__ import annotations

from pathlib import Path

from compression.distill import DistillStageSpec, run_distill
from compression.stages import (
    PruneStageSpec,
    SearchStageSpec,
    external_model_ref,
    run_importance,
    run_prune,
    run_search,
)
from flows.recipe import Recipe
from model.contract import DataRef, ModelRef
from model.pretrain import run_prepare_data, run_pretrain
from model.specs import TokenizerSpec

STAGES = ("data", "pretrain", "importance", "search", "prune", "distill")


def resolve_start_from(uri: str, store) -> Path:
    """A local checkpoint folder for a recipe's ``start_from``."""
    if uri.startswith("hf:"):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(uri.removeprefix("hf:")))
    if uri.startswith(("models:/", "s3://")):
        from registry.models import resolve_checkpoint

        return Path(resolve_checkpoint(uri, store))
    return Path(uri).expanduser().resolve()


def prepare_data(recipe: Recipe, store) -> tuple[DataRef, Path | None]:
    """The recipe's data, tokenized with the teacher's tokenizer when the teacher is given."""
    if recipe.start_from:
        teacher_dir = resolve_start_from(recipe.start_from, store)
        return run_prepare_data(recipe.data, TokenizerSpec(path=str(teacher_dir)), store, recipe.name), teacher_dir
    return run_prepare_data(recipe.data, recipe.tokenizer, store, recipe.name), None


def teacher_ref(recipe: Recipe, store, data: DataRef, teacher_dir: Path | None, callbacks=()) -> ModelRef:
    if teacher_dir is not None:
        return external_model_ref(teacher_dir)
    return run_pretrain(recipe.pretrain_spec(), {"data": data}, store, callbacks=callbacks)


def compress(recipe: Recipe, store, teacher: ModelRef, data: DataRef) -> dict:
    """Importance, then the recipe's fixed target or the search's choice, then pruning."""
    spec = recipe.compress
    refs = {"scores": run_importance(spec.importance, {"teacher": teacher, "data": data}, store, recipe.name)}
    if spec.search is not None:
        refs["search"] = run_search(SearchStageSpec(name=recipe.name, search=spec.search),
                                    {"teacher": teacher, "scores": refs["scores"], "data": data}, store)
        target = refs["search"].metadata["chosen_target"]
    else:
        target = spec.target
    refs["student"] = run_prune(PruneStageSpec(name=recipe.name, target=target),
                                {"teacher": teacher, "scores": refs["scores"]}, store)
    return refs


def run(recipe: Recipe, store, until: str = "distill", callbacks=()) -> dict:
    """Every stage up to ``until``; returns the refs by name (data, teacher, scores, search,
    student, distilled)."""
    if until not in ("pretrain", "compress", "distill"):
        raise ValueError(f"until must be pretrain, compress or distill, got {until!r}")
    data, teacher_dir = prepare_data(recipe, store)
    refs = {"data": data, "teacher": teacher_ref(recipe, store, data, teacher_dir, callbacks)}
    if until == "pretrain":
        return refs
    if recipe.compress is None:
        raise ValueError(f"recipe {recipe.name} has no compress section")
    refs |= compress(recipe, store, refs["teacher"], data)
    if until == "compress":
        return refs
    if recipe.distill is None:
        raise ValueError(f"recipe {recipe.name} has no distill section")
    refs["distilled"] = run_distill(DistillStageSpec(name=recipe.name, distill=recipe.distill),
                                    {"student": refs["student"], "teacher": refs["teacher"], "data": data}, store,
                                    callbacks=callbacks)
    return refs
