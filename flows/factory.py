"""The factory as Prefect flows: a recipe in, a registered, evaluated model out.

    prepare-data -> pretrain (or the recipe's start_from) -> importance -> search | target
                 -> prune -> distill -> evaluate -> register (teacher, then student)

``factory`` runs everything; ``pretrain``, ``compress``, ``distill`` and ``evaluate`` run
up to their stage, earlier stages coming from cache. Each flow takes the pydantic
``Recipe`` (the Prefect UI renders it as a form) or a path to a recipe file.

Resuming: a finished stage is a cached task (its key is the stage's own key, so a new flow
run reuses it), an interrupted training stage resumes from its newest checkpoint, and
registration is idempotent on the checkpoint digest, so running the same recipe again after
a crash anywhere finishes the work and registers exactly one version.
"""


# No `from __future__ import annotations` here: Prefect builds each flow's parameter form
# (the UI, deployments) from the real annotations, and string ones do not resolve in a worker.
from pathlib import Path

from prefect import flow, get_run_logger

from flows.pipeline import compose, sdg_inputs, student_metrics
from flows.recipe import Recipe, load_recipe
from registry.store import open_store
from tasks import stages


def as_recipe(recipe: Recipe | str) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def run_stage(task, store, *args, **kwargs):
    """Call a task; if its cached ref points at an artifact that is gone or changed, run it again.

    Prefect returns a persisted result without running the task; the artifact behind it may
    have been deleted since. ``refresh_cache`` recomputes and overwrites the cached result."""
    ref = task(*args, **kwargs)
    if not store.verify(ref.uri, ref.digest):
        get_run_logger().warning(f"{task.name}: the cached result's artifact {ref.uri} is missing or changed; recomputing")
        ref = task.with_options(refresh_cache=True)(*args, **kwargs)
    return ref


class PrefectStages:
    """Each stage as a Prefect task (flows/pipeline.py DirectStages, orchestrated and tracked)."""

    def __init__(self, store, parent_run: str | None, recipe_digest: str = ""):
        self.store, self.parent_run, self.recipe_digest = store, parent_run, recipe_digest

    def prepare_data(self, spec, recipe_name):
        return run_stage(stages.prepare_data, self.store, spec, recipe_name, self.parent_run)

    def pretrain(self, spec, inputs):
        return run_stage(stages.pretrain, self.store, spec, inputs, self.parent_run)

    def importance(self, spec, inputs, recipe_name):
        return run_stage(stages.importance, self.store, spec, inputs, recipe_name, self.parent_run)

    def search(self, spec, inputs):
        return run_stage(stages.search, self.store, spec, inputs, self.parent_run)

    def prune(self, spec, inputs):
        return run_stage(stages.prune, self.store, spec, inputs, self.parent_run)

    def distill(self, spec, inputs):
        return run_stage(stages.distill, self.store, spec, inputs, self.parent_run)

    def evaluate(self, spec, inputs, recipe_name):
        return run_stage(stages.evaluate, self.store, spec, inputs, recipe_name, self.parent_run)

    def sdg(self, spec, inputs, recipe_name):
        return run_stage(stages.sdg, self.store, spec, inputs, recipe_name, self.recipe_digest, self.parent_run)

    def register(self, ref, model_name, **kwargs):
        return stages.register(ref, model_name, parent_run=self.parent_run, **kwargs)


def _tracked_run(recipe: Recipe, until: str) -> dict:
    """The stages up to ``until`` (or ``sdg``) as tasks, under one parent MLflow run."""
    from model.contract import json_digest
    from registry import tracking

    tracking.configure_tracking()
    spec = recipe.registry
    with tracking.factory_run(recipe, experiment=spec.resolved_experiment(recipe.name),
                              tags={"factory.until": until}) as run_id:
        stages_ = PrefectStages(open_store(), run_id, json_digest(recipe))
        if until == "sdg":
            return {"sdg": stages_.sdg(recipe.sdg, sdg_inputs(recipe, stages_), recipe.name)}
        refs = compose(recipe, until, stages_)
    gate = refs.get("gate")
    if gate is not None and not gate.passed:
        get_run_logger().warning(f"the gate failed ({'; '.join(gate.reasons)}); champion not moved")
    return refs


@flow(name="factory", log_prints=True)
def factory(recipe: Recipe | str) -> dict:
    """The whole factory: pretrain, compress, distill, evaluate, register. Returns the refs."""
    return _tracked_run(as_recipe(recipe), "register")


@flow(name="pretrain", log_prints=True)
def pretrain(recipe: Recipe | str) -> dict:
    """Data and the teacher."""
    return _tracked_run(as_recipe(recipe), "pretrain")


@flow(name="compress", log_prints=True)
def compress(recipe: Recipe | str) -> dict:
    """Up to the pruned student (importance, search or target, prune)."""
    return _tracked_run(as_recipe(recipe), "compress")


@flow(name="distill", log_prints=True)
def distill(recipe: Recipe | str) -> dict:
    """Up to the distilled student."""
    return _tracked_run(as_recipe(recipe), "distill")


@flow(name="evaluate", log_prints=True)
def evaluate(recipe: Recipe | str) -> dict:
    """Up to the evaluation of teacher and student (report and gate)."""
    return _tracked_run(as_recipe(recipe), "evaluate")


@flow(name="sdg", log_prints=True)
def sdg(recipe: Recipe | str) -> dict:
    """Synthetic data generation: prompts, responses, scores, filters -> SFT and preference datasets."""
    return _tracked_run(as_recipe(recipe), "sdg")


FLOWS = {"sdg": sdg, "factory": factory, "pretrain": pretrain, "compress": compress, "distill": distill, "evaluate": evaluate}


def summary_table(refs: dict) -> str:
    """Teacher vs student: parameters, validation loss, decode speed (what `make demo` prints)."""
    from model.architectures import format_parameters

    evaluation = refs.get("evaluation")
    rows = [("teacher", refs["teacher"], evaluation.metrics.get(evaluation.teacher, {}) if evaluation else {}),
            ("student", refs.get("distilled") or refs.get("student"), student_metrics(evaluation) if evaluation else {})]
    lines = [f"{'':8} {'parameters':>11} {'val loss':>9} {'decode tok/s':>13}"]
    for label, ref, m in rows:
        if ref is None:
            continue
        val = m.get("val_loss", ref.metrics.get("val_loss") if hasattr(ref, "metrics") else None)
        decode = next((v for k, v in m.items() if k.startswith("decode_tokens_per_s")), None)
        lines.append(f"{label:8} {format_parameters(ref.architecture.parameters):>11} "
                     f"{val if val is None else format(val, '.3f'):>9} {'' if decode is None else format(decode, '.1f'):>13}")
    return "\n".join(lines)


def report_path(refs: dict) -> Path | None:
    evaluation = refs.get("evaluation")
    return Path(open_store().fetch(evaluation.uri)) / "report.md" if evaluation else None
