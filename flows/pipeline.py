"""The factory's stages in order, once, for every way of running them.

    data -> teacher (pretrain, or the recipe's start_from) -> importance -> search (or a fixed target)
         -> prune -> distill -> [sdg -> sft -> preference] -> evaluate -> register (teacher, student, aligned)

(the bracket: with an ``align`` section; a recipe may align its teacher without compressing it)

``compose(recipe, until, runner)`` is that sequence. Each line hands one stage module its spec
and the refs it takes, and never looks inside a ref (the prune stage reads the search's choice,
the register stage the gate), so the same sequence can run, be planned or be orchestrated;
``runner.run(stage, spec, inputs)`` says how:

    DirectRunner   each stage called in this process (``factory pretrain|compress|distill|evaluate``)
    PlanRunner     nothing runs: each stage is cached or to run, and why (``factory run --plan``)
    PrefectRunner  each stage a cached, retried, tracked Prefect task (``flows/factory.py``)

Adding a stage is its module (``model/contract.py`` says what it exports) plus one line here.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from alignment import preference_stage, reward_stage, sft_stage
from alignment.align_stage import dataset_ref
from alignment.spec import SDG, STUDENT, TEACHER
from compression import distill_stage, importance_stage, prune_stage, search_stage
from compression.prune_stage import PruneSpec
from evaluation import evaluate_stage
from flows.recipe import Recipe
from model import data_stage, pretrain_stage
from model.contract import ArtifactStore, Ref, StageContext, ref_key, stored_ref
from model.data_stage import DataStageSpec
from model.device import DevicePolicy, fp8_problem
from model.digests import json_digest
from model.spec import TokenizerSpec, TrainSpec
from registry import register_stage
from registry.register_stage import RegistrationSpec
from sdg import sdg_stage

STAGES = (data_stage, pretrain_stage, importance_stage, search_stage, prune_stage, distill_stage, sdg_stage,
          sft_stage, preference_stage, reward_stage, evaluate_stage, register_stage)
ALIGN_STAGES = {"sft": sft_stage, "preference": preference_stage}

# How far ``factory pretrain|compress|distill|align|evaluate|run`` goes, and the ref that is its result
# (``result_name``: with an align section, the aligned model's version is what a run registers last).
UNTIL = {"pretrain": "teacher", "compress": "student", "distill": "distilled", "align": "aligned",
         "evaluate": "evaluation", "register": "student_version"}


def result_name(recipe: Recipe, until: str) -> str:
    """The name of the ref ``compose(recipe, until)`` ends with."""
    return "aligned_version" if until == "register" and recipe.align is not None else UNTIL[until]


def final_model(refs: dict):
    """The model a run makes last: the aligned one, else the distilled student."""
    return refs.get("aligned") or refs.get("distilled")


def context_for(recipe: Recipe, parent_run: str | None = None) -> StageContext:
    """The context of every stage of a recipe's run: its name and digest, the tracking run, and
    this worker's device policy (``FACTORY_DEVICE``), checked now against the recipe: a worker
    told to use CUDA that has none, or a ``precision: fp8`` loop on a device that cannot run
    float8, fails before any stage starts."""
    device = DevicePolicy.from_environment()
    device.choose()
    for path, train in train_sections(recipe):
        if train.precision == "fp8" and (problem := fp8_problem(device.choose(train.device, f"{path}.device"))):
            raise ValueError(f"{path}.precision is 'fp8' but {problem}")
    return StageContext(recipe_name=recipe.name, recipe_digest=json_digest(recipe), parent_run=parent_run,
                        device=device)


def train_sections(section, path: str = ""):
    """(dotted path, TrainSpec) of every training loop in a recipe: pretraining, short KD, distillation."""
    for name in type(section).model_fields:
        value, where = getattr(section, name), f"{path}.{name}" if path else name
        if isinstance(value, TrainSpec):
            yield where, value
        elif isinstance(value, BaseModel):
            yield from train_sections(value, where)


def resolve_start_from(uri: str, store: ArtifactStore) -> Path:
    """A local checkpoint folder for a recipe's ``start_from``."""
    if uri.startswith("hf:"):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(uri.removeprefix("hf:")))
    if uri.startswith(("models:/", "s3://")):
        from registry.models import resolve_checkpoint

        return Path(resolve_checkpoint(uri, store))
    return Path(uri).expanduser().resolve()


def compose(recipe: Recipe, until: str, runner) -> dict:
    """Run the stages up to ``until`` (a key of UNTIL); returns every ref by name."""
    if until not in UNTIL:
        raise ValueError(f"until must be one of {', '.join(UNTIL)}, got {until!r}")
    if until != "pretrain" and recipe.compress is None and recipe.align is None:
        raise ValueError(f"recipe {recipe.name} has no compress section: it can only pretrain")
    if until == "compress" and recipe.compress is None:
        raise ValueError(f"recipe {recipe.name} has no compress section")
    if until not in ("pretrain", "compress", "align") and recipe.distill is None and recipe.align is None \
            or until == "distill" and recipe.distill is None:
        raise ValueError(f"recipe {recipe.name} has no distill section")
    if until == "align" and recipe.align is None:
        raise ValueError(f"recipe {recipe.name} has no align section")
    refs = {}
    teacher_dir = resolve_start_from(recipe.start_from, runner.store) if recipe.start_from else None
    tokenizer = TokenizerSpec(path=str(teacher_dir)) if teacher_dir else recipe.tokenizer
    refs["data"] = runner.run(data_stage, DataStageSpec(data=recipe.data, tokenizer=tokenizer), {})
    if teacher_dir is not None:
        from model.architectures import external_model_ref

        refs["teacher"] = external_model_ref(teacher_dir)
    else:
        refs["teacher"] = runner.run(pretrain_stage, recipe.pretrain_spec(), {"data": refs["data"]})
    if until == "pretrain":
        return refs

    if recipe.compress is not None:
        teacher_and_data = {"teacher": refs["teacher"], "data": refs["data"]}
        refs["scores"] = runner.run(importance_stage, recipe.compress.importance, teacher_and_data)
        prune_inputs = {"teacher": refs["teacher"], "scores": refs["scores"]}
        if recipe.compress.search is not None:
            refs["search"] = prune_inputs["search"] = runner.run(search_stage, recipe.compress.search,
                                                                  teacher_and_data | {"scores": refs["scores"]})
        refs["student"] = runner.run(prune_stage, PruneSpec(target=recipe.compress.target), prune_inputs)
        if until == "compress":
            return refs
    if recipe.distill is not None:
        refs["distilled"] = runner.run(distill_stage, recipe.distill,
                                       {"student": refs["student"], "teacher": refs["teacher"], "data": refs["data"]})
    if until == "distill":
        return refs

    if recipe.align is not None:
        refs |= align(recipe, runner, refs)
    if until == "align":
        return refs

    models = [ref for ref in (refs.get("distilled"), refs.get("aligned")) if ref is not None]
    refs["evaluation"] = runner.run(evaluate_stage, recipe.evaluate,
                                    {"teacher": refs["teacher"], "models": models, "data": refs["data"]})
    if until == "evaluate":
        return refs

    registry = recipe.registry
    name = registry.resolved_model_name(recipe.name)
    how = {"experiment": registry.resolved_experiment(recipe.name), "key_metrics": registry.key_metrics}
    # The teacher first, so the student's version can point at it (lineage by checkpoint digest).
    refs["teacher_version"] = runner.run(register_stage, RegistrationSpec(model_name=f"{name}-teacher", **how),
                                         {"model": refs["teacher"], "data": refs["data"]})
    if "distilled" in refs:
        refs["student_version"] = runner.run(register_stage, RegistrationSpec(model_name=name, **how),
                                             {"model": refs["distilled"], "data": refs["data"],
                                              "evaluation": refs["evaluation"]})
    if "aligned" in refs:
        # Named after the version it was aligned from (its parent) and the synthetic data's digest.
        base = {STUDENT: "student_version", TEACHER: "teacher_version"}.get(recipe.align.model)
        inputs = {"model": refs["aligned"], "data": refs["alignment_data"], "evaluation": refs["evaluation"]}
        if base is not None:
            inputs["parent"] = refs[base]
        elif recipe.align.model.startswith("models:/"):
            from registry.models import version_ref

            inputs["parent"] = version_ref(recipe.align.model)
        # A new version of the registered model it was aligned from; of ``<name>-aligned`` for a folder.
        if recipe.align.model in (STUDENT, TEACHER):
            model_name = name if recipe.align.model == STUDENT else f"{name}-teacher"
        else:
            model_name = inputs["parent"].name if "parent" in inputs else f"{name}-aligned"
        refs["aligned_version"] = runner.run(register_stage, RegistrationSpec(model_name=model_name, **how), inputs)
    return refs


def align(recipe: Recipe, runner, refs: dict) -> dict:
    """The align steps (``sft``, then ``preference``) on the model ``recipe.align.model`` names,
    each on its data: this recipe's SDG output (run now, or from cache) or a given dataset.
    Returns the SDG ref (when it ran), each step's model (``sft``, ``preference``), ``aligned`` and
    ``alignment_data``: the synthetic data where a step used it, else the last step's data."""
    spec = recipe.align
    out = {}
    if spec.model == STUDENT:
        model = refs["distilled"]
    elif spec.model == TEACHER:
        model = refs["teacher"]
    else:
        from model.architectures import external_model_ref

        model = external_model_ref(resolve_start_from(spec.model, runner.store))
    for name, step in spec.steps():
        if step.data == SDG:
            if "sdg" not in out:
                out["sdg"] = runner.run(sdg_stage, recipe.sdg, sdg_inputs(recipe, runner, refs["teacher"]))
            data = out["sdg"]
        else:
            data = dataset_ref(step.data, runner.store)
        model = out[name] = runner.run(ALIGN_STAGES[name], step, {"model": model, "data": data})
    out["alignment_data"] = out.get("sdg") or data  # what the registered version names as its data
    out["aligned"] = model
    return out


def reward_model(recipe: Recipe, runner):
    """The recipe's reward model: a head trained on ``reward_model.base`` (the teacher, the
    distilled student or a given checkpoint) over ``reward_model.data``."""
    spec = recipe.reward_model
    if spec is None:
        raise ValueError(f"recipe {recipe.name} has no reward_model section")
    refs = {}
    if spec.base in (STUDENT, TEACHER) or spec.data == SDG:
        refs = compose(recipe, "distill" if spec.base == STUDENT else "pretrain", runner)
    if spec.base in (STUDENT, TEACHER):
        base = refs["distilled" if spec.base == STUDENT else "teacher"]
    else:
        from model.architectures import external_model_ref

        base = external_model_ref(resolve_start_from(spec.base, runner.store))
    if spec.data == SDG:
        data = runner.run(sdg_stage, recipe.sdg, sdg_inputs(recipe, runner, refs["teacher"]))
    else:
        data = dataset_ref(spec.data, runner.store)
    return runner.run(reward_stage, spec, {"base": base, "data": data})


def sdg_inputs(recipe: Recipe, runner, teacher=None) -> dict:
    """The checkpoints the recipe's sdg section names: ``teacher`` (``teacher``, else pretrained by
    the recipe, or its start_from: from cache when done), ``models:/`` and ``s3://`` URIs, resolved to refs."""
    from sdg.spec import TEACHER

    if recipe.sdg is None:
        raise ValueError(f"recipe {recipe.name} has no sdg section")
    inputs = {}
    for name, uri in recipe.sdg.checkpoints().items():
        if uri == TEACHER:
            teacher = teacher or compose(recipe, "pretrain", runner)["teacher"]
            inputs[name] = teacher
        elif uri.startswith(("models:/", "s3://")):
            inputs[name] = sdg_stage.checkpoint_ref(resolve_start_from(uri, runner.store))
    return inputs


# --------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------


def result_type(stage) -> type[Ref]:
    """The ref class a stage's ``run`` returns (its return annotation)."""
    return typing.get_type_hints(stage.run)["return"]


def cached_result(stage, spec, inputs: dict, store: ArtifactStore) -> Ref | None:
    """The stage's stored ref for these spec and inputs when its artifact is whole; None otherwise
    (or when the stage is never cached)."""
    key = stage.key(spec, inputs)
    return stored_ref(store, ref_key(stage.NAME, key), result_type(stage)) if key is not None else None


class DirectRunner:
    """Each stage as a plain call in this process (no orchestrator, no tracking); a stage whose
    result is stored returns it without running (or importing what it would run)."""

    def __init__(self, store: ArtifactStore, context: StageContext):
        self.store, self.context = store, context

    def run(self, stage, spec, inputs: dict):
        hit = cached_result(stage, spec, inputs, self.store)
        return hit if hit is not None else stage.run(spec, inputs, self.store, self.context)


@dataclass
class Pending:
    """A result that does not exist yet: its stage would run, and so would every stage that takes it."""

    stage: str


@dataclass
class PlanStep:
    stage: str
    cached: bool
    reason: str
    result: object  # the stored ref, or a Pending
    cacheable: bool = True  # False: the stage runs every time (its key is None)
    name: str = ""  # what compose calls the result (data, teacher, scores, ...)
    key: str = ""  # the stage's cache key ("" until its inputs exist, or when never cached)


@dataclass
class PlanRunner:
    """Runs nothing: records for each stage whether its result is stored (and whole) or why it
    would run, passing stored refs on so that later stages' keys can be computed."""

    store: ArtifactStore
    steps: list[PlanStep] = field(default_factory=list)

    def run(self, stage, spec, inputs: dict):
        pending = sorted({v.stage for v in _flatten(inputs.values()) if isinstance(v, Pending)})
        if pending:
            return self._record(stage, False, f"after {', '.join(pending)}")
        key = stage.key(spec, inputs)
        if key is None:
            return self._record(stage, False, "every run (never cached: idempotent by itself)", cacheable=False)
        stored = self.store.read_ref(ref_key(stage.NAME, key), result_type(stage))
        if stored is None:
            return self._record(stage, False, f"no stored result for key {key[:12]} (new spec, inputs or code)", key=key)
        if not self.store.verify(stored.uri, stored.digest):
            return self._record(stage, False, f"the stored artifact {stored.uri} is missing or changed", key=key)
        return self._record(stage, True, f"{stored.uri}", stored, key=key)

    def _record(self, stage, cached: bool, reason: str, result=None, cacheable: bool = True, key: str = ""):
        result = result if result is not None else Pending(stage.NAME)
        self.steps.append(PlanStep(stage.NAME, cached, reason, result, cacheable, key=key))
        return result

    def name_steps(self, refs: dict) -> list[PlanStep]:
        """The steps, each named by the key compose gave its result."""
        names = {id(value): name for name, value in refs.items()}
        for step in self.steps:
            step.name = names.get(id(step.result), step.stage)
        return self.steps


def _flatten(values):
    for value in values:
        if isinstance(value, list | tuple):
            yield from value
        else:
            yield value


def plan(recipe: Recipe, store: ArtifactStore, until: str = "register") -> list[PlanStep]:
    """Each stage of the recipe up to ``until``: cached (and where) or to run (and why)."""
    runner = PlanRunner(store)
    return runner.name_steps(compose(recipe, until, runner))


def run(recipe: Recipe, store: ArtifactStore, until: str = "distill", context: StageContext | None = None) -> dict:
    """Every stage up to ``until``, called directly."""
    return compose(recipe, until, DirectRunner(store, context or context_for(recipe)))
