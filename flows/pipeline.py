"""The factory's stages in order, once, for every way of running them.

    data -> teacher (pretrain, or the recipe's start_from) -> importance -> search | target
         -> prune -> distill -> evaluate -> register (teacher, then student)

``compose(recipe, until, stages)`` is the sequence; ``stages`` says how each stage runs:
``DirectStages`` calls the stage functions in this process (``factory pretrain|compress|
distill|evaluate``, and the baseline the orchestration benchmark measures against);
``flows/factory.py`` runs them as Prefect tasks. Every stage returns a ref and skips work
whose result is already stored, so running a recipe twice computes nothing the second time.
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
from model.contract import json_digest
from model.pretrain import DataStageSpec, run_prepare_data, run_pretrain
from model.specs import TokenizerSpec

UNTIL = ("pretrain", "compress", "distill", "evaluate", "register")


def resolve_start_from(uri: str, store) -> Path:
    """A local checkpoint folder for a recipe's ``start_from``."""
    if uri.startswith("hf:"):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(uri.removeprefix("hf:")))
    if uri.startswith(("models:/", "s3://")):
        from registry.models import resolve_checkpoint

        return Path(resolve_checkpoint(uri, store))
    return Path(uri).expanduser().resolve()


def compose(recipe: Recipe, until: str, stages) -> dict:
    """Run the stages up to ``until`` (one of UNTIL); returns every ref by name."""
    if until not in UNTIL:
        raise ValueError(f"until must be one of {UNTIL}, got {until!r}")
    if until != "pretrain" and recipe.compress is None:
        raise ValueError(f"recipe {recipe.name} has no compress section: it can only pretrain")
    if until not in ("pretrain", "compress") and recipe.distill is None:
        raise ValueError(f"recipe {recipe.name} has no distill section")
    refs = {}
    teacher_dir = resolve_start_from(recipe.start_from, stages.store) if recipe.start_from else None
    tokenizer = TokenizerSpec(path=str(teacher_dir)) if teacher_dir else recipe.tokenizer
    refs["data"] = stages.prepare_data(DataStageSpec(data=recipe.data, tokenizer=tokenizer), recipe.name)
    if teacher_dir is not None:
        refs["teacher"] = external_model_ref(teacher_dir)
    else:
        refs["teacher"] = stages.pretrain(recipe.pretrain_spec(), {"data": refs["data"]})
    if until == "pretrain":
        return refs

    teacher_and_data = {"teacher": refs["teacher"], "data": refs["data"]}
    refs["scores"] = stages.importance(recipe.compress.importance, teacher_and_data, recipe.name)
    target = recipe.compress.target
    if recipe.compress.search is not None:
        refs["search"] = stages.search(SearchStageSpec(name=recipe.name, search=recipe.compress.search),
                                       teacher_and_data | {"scores": refs["scores"]})
        target = refs["search"].metadata["chosen_target"]
    refs["student"] = stages.prune(PruneStageSpec(name=recipe.name, target=target),
                                   {"teacher": refs["teacher"], "scores": refs["scores"]})
    if until == "compress":
        return refs

    refs["distilled"] = stages.distill(DistillStageSpec(name=recipe.name, distill=recipe.distill),
                                       {"student": refs["student"], "teacher": refs["teacher"], "data": refs["data"]})
    if until == "distill":
        return refs

    refs["evaluation"] = stages.evaluate(recipe.evaluate, {"teacher": refs["teacher"], "models": [refs["distilled"]],
                                                           "data": refs["data"]}, recipe.name)
    if until == "evaluate":
        return refs

    spec = recipe.registry
    name = spec.resolved_model_name(recipe.name)
    common = dict(recipe_name=recipe.name, recipe_digest=json_digest(recipe), data_digest=refs["data"].digest,
                  key_metrics=list(spec.key_metrics))
    # The teacher first, so the student's version can point at it (lineage by checkpoint digest).
    refs["teacher_version"] = stages.register(refs["teacher"], f"{name}-teacher", **common)
    gate = next(iter(refs["evaluation"].gates.values()), None)
    refs["gate"] = gate
    refs["student_version"] = stages.register(refs["distilled"], name, gate_passed=gate.passed if gate else None,
                                              gate_metrics=student_metrics(refs["evaluation"]), **common)
    return refs


def sdg_inputs(recipe: Recipe, stages) -> dict:
    """The checkpoints the recipe's sdg section names: ``teacher`` (pretrained by the recipe, or
    its start_from: from cache when done), ``models:/`` and ``s3://`` URIs, resolved to refs."""
    from sdg.spec import TEACHER
    from sdg.stage import checkpoint_ref

    if recipe.sdg is None:
        raise ValueError(f"recipe {recipe.name} has no sdg section")
    inputs, teacher = {}, None
    for name, uri in recipe.sdg.checkpoints().items():
        if uri == TEACHER:
            teacher = teacher or compose(recipe, "pretrain", stages)["teacher"]
            inputs[name] = teacher
        elif uri.startswith(("models:/", "s3://")):
            inputs[name] = checkpoint_ref(resolve_start_from(uri, stages.store))
    return inputs


def student_metrics(evaluation) -> dict[str, float]:
    return next((m for label, m in evaluation.metrics.items() if label != evaluation.teacher), {})


class DirectStages:
    """Each stage as a plain function call in this process (no orchestrator, no tracking)."""

    def __init__(self, store, callbacks: tuple = ()):
        self.store, self.callbacks = store, callbacks

    def prepare_data(self, spec: DataStageSpec, recipe_name: str):
        return run_prepare_data(spec.data, spec.tokenizer, self.store, recipe_name)

    def pretrain(self, spec, inputs):
        return run_pretrain(spec, inputs, self.store, callbacks=self.callbacks)

    def importance(self, spec, inputs, recipe_name: str):
        return run_importance(spec, inputs, self.store, recipe_name)

    def search(self, spec, inputs):
        return run_search(spec, inputs, self.store)

    def prune(self, spec, inputs):
        return run_prune(spec, inputs, self.store)

    def distill(self, spec, inputs):
        return run_distill(spec, inputs, self.store, callbacks=self.callbacks)

    def evaluate(self, spec, inputs, recipe_name: str):
        from model.evaluation.stage import run_evaluate

        return run_evaluate(spec, inputs, self.store, name=recipe_name)

    def sdg(self, spec, inputs, recipe_name: str):
        from sdg.stage import run_sdg

        return run_sdg(spec, inputs, self.store, recipe_name)

    def register(self, ref, model_name: str, recipe_name: str, recipe_digest: str, data_digest: str,
                 key_metrics: list[str], gate_passed: bool | None = None, gate_metrics: dict | None = None) -> str:
        from registry import models, tracking

        tracking.configure_tracking()
        version = models.register_checkpoint(ref, self.store, model_name, experiment=recipe_name,
                                             recipe_digest=recipe_digest, data_digest=data_digest,
                                             key_metrics=tuple(key_metrics))
        if gate_passed is not None:
            models.set_gate_result(model_name, version.version, gate_passed, gate_metrics)
        return version.uri


def run(recipe: Recipe, store, until: str = "distill", callbacks: tuple = ()) -> dict:
    """Every stage up to ``until``, called directly."""
    return compose(recipe, until, DirectStages(store, callbacks))
