"""The factory as Prefect flows: a recipe in, a registered, evaluated model out.

    data -> pretrain (or the recipe's start_from) -> importance -> search | target
         -> prune -> distill -> [sdg -> sft -> preference] -> evaluate -> register (teacher, student, aligned)

``factory`` runs everything; ``pretrain``, ``compress``, ``distill``, ``align`` and ``evaluate``
run up to their stage, earlier stages coming from cache; ``sdg`` makes synthetic data. Each flow
takes the pydantic ``Recipe`` (the Prefect UI renders it as a form) or a path to a recipe file,
and its runs are named after the recipe: ``tiny: factory``, ``tiny: distill``.

Resuming: a finished stage is a cached task (its key is the stage's own key, so a new flow
run reuses it), an interrupted training stage resumes from its newest checkpoint, and
registration is idempotent on the checkpoint digest, so running the same recipe again after
a crash anywhere finishes the work and registers exactly one version.
"""


# No `from __future__ import annotations` here: Prefect builds each flow's parameter form
# (the UI, deployments) from the real annotations, and string ones do not resolve in a worker.
from pathlib import Path

from prefect import flow, get_run_logger

from flows.pipeline import compose, context_for, final_model, sdg_inputs
from flows.recipe import Recipe, load_recipe
from model.contract import ArtifactStore, Ref, StageContext
from sdg import sdg_stage
from store import open_store
from tasks.stage_task import stage_task


def as_recipe(recipe: Recipe | str) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def run_name(recipe, flow_name: str) -> str:
    """A flow run's name: ``<recipe name>: <flow>``. ``recipe`` is the run's parameter (a Recipe,
    its dict, or a path); a file that does not load is named by its stem (the run then fails
    with the recipe's own errors)."""
    name = recipe.get("name") if isinstance(recipe, dict) else getattr(recipe, "name", None)
    if name is None and isinstance(recipe, str | Path):
        try:
            name = load_recipe(recipe).name
        except Exception:  # noqa: BLE001 - naming never fails a run; loading it again reports the error
            name = Path(recipe).stem
    return f"{name or 'recipe'}: {flow_name}"


def _named_after_the_recipe() -> str:
    """Prefect's ``flow_run_name`` callable: it runs with the validated parameters in context."""
    from prefect.runtime import flow_run

    return run_name(flow_run.parameters.get("recipe"), flow_run.flow_name)


class PrefectRunner:
    """Each stage as its Prefect task (``tasks/stage_task.py``): cached on the stage's key,
    retried on transient errors, tracked in a nested MLflow run.

    Prefect returns a persisted result without running the task; the artifact behind it may
    have been deleted since, so a cached ref whose artifact is missing or changed is computed
    again (``refresh_cache`` overwrites the cached result)."""

    def __init__(self, store: ArtifactStore, context: StageContext):
        self.store, self.context = store, context

    def run(self, stage, spec, inputs: dict):
        task = stage_task(stage)
        result = task(spec, inputs, self.context)
        if isinstance(result, Ref) and not self.store.verify(result.uri, result.digest):
            get_run_logger().warning(f"{stage.NAME}: the cached result's artifact {result.uri} is missing or changed; "
                                     "recomputing")
            result = task.with_options(refresh_cache=True)(spec, inputs, self.context)
        return result


def _tracked_run(recipe: Recipe, until: str) -> dict:
    """The stages up to ``until`` (or ``sdg``) as tasks, under one parent MLflow run."""
    from prefect.runtime import deployment

    from registry import tracking

    tracking.require_shared_tracking(deployment.id)  # a worker's SQLite file would die with it
    tracking.configure_tracking()
    with tracking.factory_run(recipe, experiment=recipe.registry.resolved_experiment(recipe.name),
                              tags={"factory.until": until}) as run_id:
        runner = PrefectRunner(open_store(), context_for(recipe, parent_run=run_id))
        if until == "sdg":
            return {"sdg": runner.run(sdg_stage, recipe.sdg, sdg_inputs(recipe, runner))}
        refs = compose(recipe, until, runner)
    if (evaluation := refs.get("evaluation")) is not None:
        gate = evaluation.gate_of(final_model(refs).digest)
        if gate is not None and not gate.passed:
            get_run_logger().warning(f"the gate failed ({'; '.join(gate.reasons)}); champion not moved")
    return refs


@flow(name="factory", flow_run_name=_named_after_the_recipe, log_prints=True)
def factory(recipe: Recipe | str) -> dict:
    """The whole factory: pretrain, compress, distill, evaluate, register. Returns the refs."""
    return _tracked_run(as_recipe(recipe), "register")


@flow(name="pretrain", flow_run_name=_named_after_the_recipe, log_prints=True)
def pretrain(recipe: Recipe | str) -> dict:
    """Data and the teacher."""
    return _tracked_run(as_recipe(recipe), "pretrain")


@flow(name="compress", flow_run_name=_named_after_the_recipe, log_prints=True)
def compress(recipe: Recipe | str) -> dict:
    """Up to the pruned student (importance, search or target, prune)."""
    return _tracked_run(as_recipe(recipe), "compress")


@flow(name="distill", flow_run_name=_named_after_the_recipe, log_prints=True)
def distill(recipe: Recipe | str) -> dict:
    """Up to the distilled student."""
    return _tracked_run(as_recipe(recipe), "distill")


@flow(name="evaluate", flow_run_name=_named_after_the_recipe, log_prints=True)
def evaluate(recipe: Recipe | str) -> dict:
    """Up to the evaluation of teacher and student (report and gate)."""
    return _tracked_run(as_recipe(recipe), "evaluate")


@flow(name="align", flow_run_name=_named_after_the_recipe, log_prints=True)
def align(recipe: Recipe | str) -> dict:
    """Up to the aligned model: SFT, then preference optimisation, on the synthetic data (made first)."""
    return _tracked_run(as_recipe(recipe), "align")


@flow(name="sdg", flow_run_name=_named_after_the_recipe, log_prints=True)
def sdg(recipe: Recipe | str) -> dict:
    """Synthetic data generation: prompts, responses, scores, filters -> SFT and preference datasets."""
    return _tracked_run(as_recipe(recipe), "sdg")
