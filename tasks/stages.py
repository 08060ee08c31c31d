"""One Prefect task per stage, each a thin wrapper over the stage function it names.

    prepare_data   model/pretrain.py      run_prepare_data  -> DataRef
    pretrain       model/pretrain.py      run_pretrain      -> ModelRef      (tag: gpu)
    importance     compression/stages.py  run_importance    -> ArtifactRef   (tag: gpu)
    search         compression/stages.py  run_search        -> ArtifactRef   (tag: gpu)
    prune          compression/stages.py  run_prune         -> ModelRef
    distill        compression/distill.py run_distill       -> ModelRef      (tag: gpu)
    evaluate       model/evaluation       run_evaluate      -> Evaluation
    register       registry/models.py     register_checkpoint + set_gate_result

Tasks pass refs, never models. Each opens a nested MLflow run under the factory's run
(when one is given), publishes a summary artifact, and returns the stage's JSON ref.
The ``gpu`` tag lets a tag concurrency limit (``prefect concurrency-limit create gpu N``)
guard the GPUs of a worker.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from compression.distill import DISTILL, DistillStageSpec, run_distill
from compression.specs import ImportanceSpec
from compression.stages import (
    IMPORTANCE,
    PRUNE,
    SEARCH,
    PruneStageSpec,
    SearchStageSpec,
    run_importance,
    run_prune,
    run_search,
)
from model.contract import ArtifactRef, DataRef, ModelRef, Stage
from model.evaluation.spec import EvaluateSpec
from model.evaluation.stage import Evaluation, run_evaluate
from model.pretrain import PRETRAIN, DataStageSpec, PretrainSpec, data_key, run_prepare_data, run_pretrain
from registry.store import open_store
from tasks import artifacts
from tasks.common import StageCache, retry_transient

EVALUATE = Stage("evaluate", ("model.evaluation.stage", "model.evaluation.quality", "model.evaluation.recall",
                              "model.evaluation.efficiency", "model.evaluation.harness", "model.evaluation.gate"))

# Persisted JSON results (refs) + retries for transient infrastructure errors only.
_TASK = dict(persist_result=True, result_serializer="json", retries=3,
             retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_condition_fn=retry_transient)


def _key(stage: Stage):
    return StageCache(lambda spec, inputs: stage.key(spec, inputs))


@contextmanager
def _tracked(parent_run: str | None, stage: str, recipe_name: str, params: dict | None = None):
    """A nested MLflow run for this stage (none when the flow runs untracked); yields its id."""
    if parent_run is None:
        with nullcontext(None) as run_id:
            yield run_id
        return
    from registry import tracking

    with tracking.stage_run(parent_run, stage, params) as run_id:
        run = tracking.client().get_run(run_id)
        artifacts.link_tracking_run(recipe_name, stage, tracking.tracking_uri(), run.info.experiment_id, run_id)
        yield run_id


def _callbacks(run_id: str | None) -> tuple:
    if run_id is None:
        return ()
    from registry import tracking

    return (tracking.metrics_callback(run_id),)


def _log_ref(run_id: str | None, ref) -> None:
    if run_id is None:
        return
    from registry import tracking

    if isinstance(ref, DataRef):
        tracking.log_data_ref(run_id, ref)
    elif isinstance(ref, ModelRef):
        tracking.log_model_ref(run_id, ref)


@task(name="prepare-data", cache_policy=StageCache(lambda spec, inputs: data_key(spec)), **_TASK)
def prepare_data(spec: DataStageSpec, recipe_name: str, parent_run: str | None = None) -> DataRef:
    """Tokenizer and packed shards of the recipe's data."""
    with _tracked(parent_run, "data", recipe_name) as run_id:
        ref = run_prepare_data(spec.data, spec.tokenizer, open_store(), recipe_name)
        _log_ref(run_id, ref)
    artifacts.summarize_ref(recipe_name, "data", ref)
    return ref


@task(name="pretrain", tags=["gpu"], cache_policy=_key(PRETRAIN), **_TASK)
def pretrain(spec: PretrainSpec, inputs: dict[str, DataRef], parent_run: str | None = None) -> ModelRef:
    """The teacher, pretrained from scratch (resumes from its newest checkpoint)."""
    with _tracked(parent_run, "pretrain", spec.name) as run_id, \
            artifacts.training_progress(spec.name, "pretrain", spec.train.steps) as progress:
        ref = run_pretrain(spec, inputs, open_store(), callbacks=(progress, *_callbacks(run_id)))
        _log_ref(run_id, ref)
    artifacts.summarize_ref(spec.name, "pretrain", ref)
    return ref


@task(name="importance", tags=["gpu"], cache_policy=_key(IMPORTANCE), **_TASK)
def importance(spec: ImportanceSpec, inputs: dict, recipe_name: str, parent_run: str | None = None) -> ArtifactRef:
    """Activation importance of every axis of the teacher, saved for every later target."""
    with _tracked(parent_run, "importance", recipe_name):
        ref = run_importance(spec, inputs, open_store(), recipe_name)
    artifacts.summarize_ref(recipe_name, "importance", ref)
    return ref


@task(name="search", tags=["gpu"], cache_policy=_key(SEARCH), **_TASK)
def search(spec: SearchStageSpec, inputs: dict, parent_run: str | None = None) -> ArtifactRef:
    """The MiniPuzzle architecture search; its table becomes a Prefect table artifact."""
    import json
    from pathlib import Path

    store = open_store()
    with _tracked(parent_run, "search", spec.name) as run_id:
        ref = run_search(spec, inputs, store)
        report = json.loads((Path(store.fetch(ref.uri)) / "search.json").read_text())
        if run_id is not None:
            from registry import tracking

            tracking.log_files(run_id, sorted(Path(store.fetch(ref.uri)).iterdir()), "search")
    rows = [{"chosen": c["chosen"], "layers": c["architecture"]["layer_pattern"],
             "hidden": c["architecture"]["hidden_size"], "ffn": c["architecture"]["intermediate_size"],
             "mamba_heads": c["architecture"]["mamba_num_heads"], "parameters": c["parameters"],
             "zero_shot_loss": c["zero_shot_loss"], "kd_loss": c["kd_loss"],
             "decode_tokens_per_s": c["decode_tokens_per_s"]} for c in report["candidates"]]
    artifacts.table(spec.name, "search", rows, "architecture search candidates")
    return ref


@task(name="prune", cache_policy=_key(PRUNE), **_TASK)
def prune(spec: PruneStageSpec, inputs: dict, parent_run: str | None = None) -> ModelRef:
    """The student: the teacher sliced to the chosen target (exact, no retraining)."""
    with _tracked(parent_run, "prune", spec.name) as run_id:
        ref = run_prune(spec, inputs, open_store())
        _log_ref(run_id, ref)
    artifacts.summarize_ref(spec.name, "prune", ref)
    return ref


@task(name="distill", tags=["gpu"], cache_policy=_key(DISTILL), **_TASK)
def distill(spec: DistillStageSpec, inputs: dict, parent_run: str | None = None) -> ModelRef:
    """The student retrained from the teacher's logits (resumes from its newest checkpoint)."""
    with _tracked(parent_run, "distill", spec.name) as run_id, \
            artifacts.training_progress(spec.name, "distill", spec.distill.train.steps) as progress:
        ref = run_distill(spec, inputs, open_store(), callbacks=(progress, *_callbacks(run_id)))
        _log_ref(run_id, ref)
    artifacts.summarize_ref(spec.name, "distill", ref)
    return ref


@task(name="evaluate", cache_policy=_key(EVALUATE), **_TASK)
def evaluate(spec: EvaluateSpec, inputs: dict, recipe_name: str, parent_run: str | None = None) -> Evaluation:
    """Teacher and student measured side by side; the gate decides whether the student is champion."""
    from pathlib import Path

    store = open_store()
    with _tracked(parent_run, "evaluate", recipe_name) as run_id:
        evaluation = run_evaluate(spec, inputs, store, name=recipe_name)
        if run_id is not None:
            from registry import tracking

            for label, metrics in evaluation.metrics.items():
                tracking.log_metrics(run_id, {f"{label}/{k}": v for k, v in metrics.items()})
            tracking.log_files(run_id, sorted(p for p in Path(store.fetch(evaluation.uri)).rglob("*") if p.is_file()),
                               "evaluation")
    report = Path(store.fetch(evaluation.uri)) / "report.md"
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(report.read_text() if report.is_file() else str(evaluation.metrics),
                             key=artifacts.artifact_key(recipe_name, "evaluate"), description="evaluation report")
    return evaluation


@task(name="sdg", tags=["gpu"], cache_policy=StageCache(lambda spec, inputs: _sdg_key(spec, inputs)), **_TASK)
def sdg(spec, inputs: dict, recipe_name: str, recipe_digest: str = "", parent_run: str | None = None) -> ArtifactRef:
    """Synthetic SFT and preference data (resumable per record), logged as MLflow datasets."""
    from sdg.stage import run_sdg

    records = artifacts.ProgressArtifact(artifacts.artifact_key(recipe_name, "sdg-progress"),
                                         "synthetic records done (%)")

    def progress(step: str, done: int, total: int) -> None:  # called per record
        if total:
            records.update(100.0 * done / total)

    with _tracked(parent_run, "sdg", recipe_name) as run_id:
        ref = run_sdg(spec, inputs, open_store(), recipe_name, progress=progress)
        if run_id is not None:
            from registry.sdg_tracking import log_sdg_output

            log_sdg_output(run_id, ref, recipe_digest=recipe_digest)
    artifacts.summarize_ref(recipe_name, "sdg", ref, notes=f"{ref.metadata.get('sft_rows')} SFT rows, "
                                                           f"{ref.metadata.get('preference_rows')} preference pairs")
    return ref


def _sdg_key(spec, inputs) -> str:
    from sdg.stage import sdg_key

    return sdg_key(spec, inputs)


@task(name="register", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=10),
      retry_condition_fn=retry_transient)
def register(ref: ModelRef, model_name: str, recipe_name: str, recipe_digest: str, data_digest: str,
             key_metrics: list[str], gate_passed: bool | None = None, gate_metrics: dict[str, float] | None = None,
             parent_run: str | None = None) -> str:
    """Register ``ref`` (idempotent on its digest: a repeat after a crash returns the same
    version), alias it ``candidate``, and ``champion`` only when the gate passed."""
    from registry import models

    with _tracked(parent_run, f"register {model_name}", recipe_name) as run_id:
        version = models.register_checkpoint(ref, open_store(), model_name, run_id=run_id, experiment=recipe_name,
                                             recipe_digest=recipe_digest, data_digest=data_digest,
                                             key_metrics=tuple(key_metrics))
        if gate_passed is not None:
            models.set_gate_result(model_name, version.version, gate_passed, gate_metrics)
    return version.uri
