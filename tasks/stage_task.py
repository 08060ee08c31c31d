"""Every stage as a Prefect task, through one generic wrapper.

``stage_task(stage)`` makes the task of a stage module (``model/contract.py`` says what a stage
exports): named after the stage, tagged with its ``TAGS`` (a tag concurrency limit,
``prefect concurrency-limit create gpu N``, guards a worker's GPUs), cached on the stage's own
key with the ref persisted as JSON beside the artifacts (``<root>/prefect-results/``, in the
bucket for an ``s3://`` root: ``tasks/policies.py: result_storage``), so every worker and a new
machine find it, and retried only on transient infrastructure errors. Each run of it:

    opens a nested MLflow run under the context's parent run (when the flow is tracked),
    runs the stage with that run, live metrics and a progress artifact in its context,
    logs what the stage made into its run and shows its summary in the Prefect UI.

Tasks pass refs, never models.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import replace

from prefect import Task, task
from prefect.tasks import exponential_backoff

from model.contract import StageContext, Summary
from store import open_store
from tasks import ui
from tasks.policies import StageCache, result_storage, retry_transient

_TASKS: dict[tuple[str, str | None], Task] = {}


def stage_task(stage) -> Task:
    """The Prefect task of a stage module, made once per stage and result storage."""
    storage = result_storage()  # None: Prefect's local storage; else the bucket's results block
    if (stage.NAME, storage) not in _TASKS:
        def run_stage(spec, inputs: dict, context: StageContext):
            return _run(stage, spec, inputs, context)

        run_stage.__doc__ = stage.run.__doc__
        _TASKS[stage.NAME, storage] = task(
            run_stage, name=stage.NAME, tags=list(getattr(stage, "TAGS", ())),
            cache_policy=StageCache(stage.key), persist_result=True, result_storage=storage,
            result_serializer="json", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=10),
            retry_condition_fn=retry_transient)
    return _TASKS[stage.NAME, storage]


def _run(stage, spec, inputs: dict, context: StageContext):
    store = open_store()
    with _tracked(context, stage, inputs) as run_id, ui.stage_progress(context.recipe_name, stage.NAME) as progress:
        on_step = ()
        if run_id is not None:
            from registry import tracking

            on_step = (tracking.metrics_callback(run_id),)
        ref = stage.run(spec, inputs, store,
                        replace(context, parent_run=run_id, on_step=on_step, on_progress=progress))
        summary = stage.summary(ref, store) if hasattr(stage, "summary") else Summary()
        if run_id is not None:
            tracking.log_stage_result(run_id, stage.NAME, ref, summary, context.recipe_digest, inputs, store)
    ui.show_result(context.recipe_name, stage.NAME, ref, summary)
    return ref


@contextmanager
def _tracked(context: StageContext, stage, inputs: dict):
    """A nested MLflow run for this stage under the context's parent run; yields its id (None
    untracked). A training stage's run has the data it trains on as its input from the start."""
    if context.parent_run is None:
        with nullcontext(None) as run_id:
            yield run_id
        return
    from registry import tracking

    with tracking.stage_run(context.parent_run, stage.NAME) as run_id:
        run = tracking.client().get_run(run_id)
        ui.link_tracking_run(context.recipe_name, stage.NAME, tracking.tracking_uri(), run.info.experiment_id, run_id)
        if (data := tracking.training_data(stage, inputs)) is not None:
            tracking.log_data_ref(run_id, data)
        yield run_id
