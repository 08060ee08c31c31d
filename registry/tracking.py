"""MLflow tracking for factory runs: plain functions the flow calls (no Prefect here).

    configure_tracking()                               MLFLOW_TRACKING_URI, or SQLite under the artifact root
    run_id = start_factory_run(recipe)                 one parent run: the resolved recipe as params, tags
    with stage_run(run_id, "pretrain") as stage_id:    a nested run per stage, with system metrics
        log_data_ref(stage_id, data_ref)               the dataset as a run input, with its digest
        pretrain_stage.run(spec, inputs, store, StageContext(on_step=(metrics_callback(stage_id),)))
        log_stage_result(stage_id, "pretrain", model_ref, summary, inputs={"data": data_ref}, store=store)
                                                       the checkpoint as this run's logged model, with its
                                                       digest, size and final metrics (registry/models.py)
        log_report(stage_id, report); log_files(stage_id, [plot])
    finish_run(run_id)

Everything goes through ``MlflowClient`` with explicit run ids, so a stage may run in
another thread or process (a Prefect task runner) than its parent. Nothing happens at
import: the tracking URI is resolved when a function is called. Every parameter, tag,
input and report passes through ``registry.secrets.scrub`` first.

The embedded default (no ``MLFLOW_TRACKING_URI``) is ``sqlite:///<root>/mlflow.db`` with
artifacts in ``<root>/mlartifacts``; for an ``s3://`` root both live in the local work
folder (``FACTORY_WORK_DIR``): point ``MLFLOW_TRACKING_URI`` at a server to share them. A flow
run from a deployment refuses the embedded default (``require_shared_tracking``): on a worker
that file dies with the pod.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import time
import typing
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel

from model.contract import DataRef, ModelRef
from model.digests import json_digest
from registry.secrets import install_log_scrubber, scrub, scrub_text, uri_has_credentials
from store import artifact_root, open_store, work_root

REPO = Path(__file__).resolve().parents[1]
_logger = logging.getLogger(__name__)
TRAINING_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "val_loss")
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value
_MONITORS: dict[str, object] = {}  # run id -> SystemMetricsMonitor, stopped by finish_run
_BUFFERS: dict[str, MetricsBuffer] = {}  # run id -> its training metrics not sent yet, flushed by finish_run


# --------------------------------------------------------------------------------------
# Where tracking goes
# --------------------------------------------------------------------------------------


def default_tracking_uri(root: str | None = None) -> str:
    root = root or artifact_root()
    base = work_root() if root.startswith("s3://") else Path(root).expanduser().resolve()
    return f"sqlite:///{base / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def require_shared_tracking(deployment_id: str | None) -> None:
    """Refuse the embedded default in a flow run from a deployment (a Prefect worker or ``serve``:
    ``deployment_id`` is ``prefect.runtime.deployment.id``): there the SQLite file would live on
    the worker and die with its pod or container, runs, metrics and model registry included.
    Called by the flows before any stage; ``factory run`` on a laptop keeps the default."""
    if not deployment_id or os.environ.get("MLFLOW_TRACKING_URI"):
        return
    raise RuntimeError(
        f"MLFLOW_TRACKING_URI is not set on this worker, and this flow run comes from deployment {deployment_id}: "
        f"tracking and the model registry would go to a SQLite file on the worker ({default_tracking_uri()}), "
        "lost with it. Set MLFLOW_TRACKING_URI to the shared tracking server (e.g. http://mlflow:5000) in the "
        "work pool's or deployment's env (deploy/README.md); to keep a local file on purpose, name it: "
        f"MLFLOW_TRACKING_URI={default_tracking_uri()}")


def configure_tracking() -> str:
    """Point MLflow (fluent API included) at ``tracking_uri()``; returns it. Call before logging."""
    import mlflow

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")) and uri_has_credentials(uri):
        raise ValueError("MLFLOW_TRACKING_URI carries credentials (user:password@host), which MLflow would print; "
                         "put them in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    install_log_scrubber()
    return uri


def client():
    """An ``MlflowClient`` on ``configure_tracking()``'s URI."""
    from mlflow import MlflowClient

    return MlflowClient(configure_tracking())


def local_artifact_location(uri: str, experiment: str) -> str | None:
    """For a SQLite store, artifacts beside the database (``mlartifacts/<experiment>``), not in
    the working directory (MLflow's default)."""
    if not uri.startswith("sqlite:///"):
        return None  # a server (or a database it fronts) decides
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment)
    return (Path(uri.removeprefix("sqlite:///")).expanduser().resolve().parent / "mlartifacts" / folder).as_uri()


def ensure_experiment(name: str) -> str:
    """The id of experiment ``name``, created (with a local artifact location if embedded) when missing."""
    from mlflow.exceptions import MlflowException

    c = client()
    experiment = c.get_experiment_by_name(name)
    if experiment is None:
        try:
            return c.create_experiment(name, artifact_location=local_artifact_location(tracking_uri(), name))
        except MlflowException:  # created by a concurrent caller in the meantime
            experiment = c.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        c.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


# --------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------


def flatten(values: dict, prefix: str = "") -> dict[str, object]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``; lists stay values."""
    flat = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{path}.")
        else:
            flat[path] = value
    return flat


def as_params(values: dict) -> dict[str, str]:
    """Scrubbed, flattened, stringified parameters (lists as JSON), cut to MLflow's length limit."""
    params = {}
    for key, value in flatten(scrub(values)).items():
        text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
        params[key] = text[:MAX_PARAM_LENGTH]
    return params


def git_commit() -> str:
    """The source's git commit (``-dirty`` with uncommitted changes), or '' outside a checkout."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=40"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _log_params(c, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow accepts at most 100 parameters per batch
        c.log_batch(run_id, params=items[start : start + 100])


def start_factory_run(recipe: BaseModel | dict, experiment: str | None = None, run_name: str | None = None,
                      tags: dict[str, str] | None = None) -> str:
    """The parent run of one factory run: the resolved recipe as dotted parameters (and as
    ``recipe.json``), tags for the recipe, its digest and the git commit. Returns its id."""
    values = recipe.model_dump(mode="json") if isinstance(recipe, BaseModel) else dict(recipe)
    name = str(values.get("name") or "factory")
    c = client()
    run_tags = {"factory.kind": "factory", "factory.recipe": name, "factory.recipe_digest": json_digest(values),
                "factory.git_commit": git_commit(), **(tags or {})}
    run = c.create_run(ensure_experiment(experiment or name), run_name=run_name or name,
                       tags={k: scrub_text(str(v)) for k, v in run_tags.items()})
    _log_params(c, run.info.run_id, as_params(values))
    c.log_dict(run.info.run_id, scrub(values), "recipe.json")
    return run.info.run_id


def start_stage_run(parent_run_id: str, stage: str, params: dict | None = None, system_metrics: bool = True) -> str:
    """A run nested under ``parent_run_id`` for one stage; samples system metrics until finish_run."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    c = client()
    parent = c.get_run(parent_run_id)
    tags = {MLFLOW_PARENT_RUN_ID: parent_run_id, "factory.kind": "stage", "factory.stage": stage,
            "factory.recipe": parent.data.tags.get("factory.recipe", "")}
    run = c.create_run(parent.info.experiment_id, run_name=stage, tags=tags)
    if params:
        _log_params(c, run.info.run_id, as_params(params))
    if system_metrics:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run.info.run_id, tracking_uri=tracking_uri())
        monitor.start()
        _MONITORS[run.info.run_id] = monitor
    return run.info.run_id


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    """Stop its system metrics, flush pending metrics, mark it FINISHED / FAILED / KILLED."""
    if (monitor := _MONITORS.pop(run_id, None)) is not None:
        monitor.finish()
    if (buffer := _BUFFERS.pop(run_id, None)) is not None:
        buffer.flush()
    client().set_terminated(run_id, status)


@contextmanager
def _finishing(run_id: str) -> Iterator[str]:
    try:
        yield run_id
    except KeyboardInterrupt:
        finish_run(run_id, "KILLED")
        raise
    except BaseException:
        finish_run(run_id, "FAILED")
        raise
    finish_run(run_id)


@contextmanager
def factory_run(recipe: BaseModel | dict, experiment: str | None = None, run_name: str | None = None,
                tags: dict[str, str] | None = None) -> Iterator[str]:
    """``start_factory_run`` ... ``finish_run``, FAILED when the body raises."""
    with _finishing(start_factory_run(recipe, experiment, run_name, tags)) as run_id:
        yield run_id


@contextmanager
def stage_run(parent_run_id: str, stage: str, params: dict | None = None, system_metrics: bool = True) -> Iterator[str]:
    """``start_stage_run`` ... ``finish_run``, FAILED when the body raises."""
    with _finishing(start_stage_run(parent_run_id, stage, params, system_metrics)) as run_id:
        yield run_id


# --------------------------------------------------------------------------------------
# What goes into a run
# --------------------------------------------------------------------------------------


class MetricsBuffer:
    """A ``model.train.StepCallback``: each training record (loss, lr, grad_norm, tokens_per_s,
    tokens_seen, val_loss) becomes metrics at its step, sent to MLflow as one batch every
    ``every_seconds`` and at ``finish_run``.

    Not MLflow's own asynchronous logging: its queue thread waits up to 1 s for items before it
    sees a stop, twice per finished run (flush, then terminate), which cost ~2 s per training
    stage; and a write per step is a request (or a SQLite transaction) per step. A batch every
    10 s keeps the UI's curves live at the price of one request. A failed send is kept and
    retried with the next one: metrics are never a reason to fail a training stage."""

    max_pending = 100_000  # while MLflow is unreachable: the newest ~20k steps are kept

    def __init__(self, run_id: str, every_seconds: float = 10.0):
        self.run_id, self.every_seconds = run_id, every_seconds
        self.pending: list = []
        self.last_sent = time.monotonic()
        _BUFFERS[run_id] = self

    def __call__(self, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(record[k]), now, int(record["step"]))
                         for k in TRAINING_METRICS if k in record and math.isfinite(float(record[k]))]
        if time.monotonic() - self.last_sent >= self.every_seconds:
            self.flush()

    def flush(self) -> None:
        self.last_sent = time.monotonic()
        c = client()
        while self.pending:
            batch = self.pending[:1000]  # MLflow's limit on metrics per log_batch
            try:
                c.log_batch(self.run_id, metrics=batch)
            except Exception as error:  # noqa: BLE001 - kept for the next flush, see the class doc
                _logger.warning(f"MLflow metrics of run {self.run_id} not sent yet ({error}); retrying later")
                del self.pending[:-self.max_pending]
                return
            del self.pending[:len(batch)]


def metrics_callback(run_id: str) -> MetricsBuffer:
    """The training loop's callback that logs its records into ``run_id`` (``finish_run`` flushes)."""
    return MetricsBuffer(run_id)


def metric_name(name: str) -> str:
    """MLflow allows letters, digits, ``_ - . : /`` and spaces: ``decode_tokens_per_s@b1_L32`` -> ``..._per_s.b1_L32``."""
    return re.sub(r"[^\w\-. :/]", ".", name)


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None, model_id: str | None = None,
                dataset: DataRef | None = None) -> None:
    """Finite scalar metrics into ``run_id``; with ``model_id`` also linked to that logged model
    (its page, and the page of every registered version made from it, shows them), with
    ``dataset`` to the data they were measured on (as ``log_data_ref`` names it)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    name, digest = dataset_identity(dataset) if dataset is not None else (None, None)
    batch = [Metric(metric_name(k), float(v), now, step or 0, model_id=model_id, dataset_name=name,
                    dataset_digest=digest)
             for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))]
    if batch:
        client().log_batch(run_id, metrics=batch)


def dataset_identity(ref: DataRef) -> tuple[str, str]:
    """The (name, digest) MLflow knows the packed data by, in run inputs and on metrics."""
    # MLflow keeps 36 characters of a digest; the full sha256 is the input's factory.digest tag.
    return scrub_text(f"{ref.source} (seq_len {ref.seq_len})")[:500], ref.digest[:32]


def log_data_ref(run_id: str, ref: DataRef, context: str = "training") -> None:
    """The packed data as a run input (``mlflow.log_input``): name, source URI, digest, token counts."""
    client().log_inputs(run_id, datasets=[data_input(ref, context)])


def data_input(ref: DataRef, context: str = "training"):
    """``ref`` as MLflow's DatasetInput, its context (``training``, ``evaluation``) as MLflow tags it."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    name, digest = dataset_identity(ref)
    dataset = Dataset(
        name=name,
        digest=digest,
        source_type="s3" if ref.uri.startswith("s3://") else "local",
        source=json.dumps({"uri": scrub_text(ref.uri)}),
        profile=json.dumps({"train_tokens": ref.train_tokens, "validation_tokens": ref.validation_tokens,
                            "seq_len": ref.seq_len, "source_digest": ref.source_digest,
                            "tokenizer_digest": ref.tokenizer_digest}),
    )
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag("factory.digest", ref.digest)]
    return DatasetInput(dataset, tags=tags)


def log_model_ref(run_id: str, ref: ModelRef, model_id: str | None = None) -> None:
    """A stage's output checkpoint: digest, URI, size and lineage as tags, its metrics (as
    ``checkpoint/<name>``, linked to logged model ``model_id`` when given), the ref as
    ``model_ref.json``."""
    from mlflow.entities import RunTag

    tags = {"factory.checkpoint_digest": ref.digest, "factory.checkpoint_uri": ref.uri,
            "factory.parameters": str(ref.architecture.parameters), "factory.layer_pattern": ref.architecture.layer_pattern,
            "factory.stage": ref.lineage.stage}
    if model_id:
        tags["factory.model_id"] = model_id
    c = client()
    c.log_batch(run_id, tags=[RunTag(k, scrub_text(v)) for k, v in tags.items()])
    log_metrics(run_id, checkpoint_metrics(ref), model_id=model_id)
    c.log_dict(run_id, scrub(ref.model_dump(mode="json")), "model_ref.json")


def checkpoint_metrics(ref: ModelRef) -> dict[str, float]:
    """A checkpoint's own metrics under ``checkpoint/`` (a group of its own in MLflow's UI), apart
    from the per-step ``val_loss`` curve of the run that trained it."""
    return {f"checkpoint/{k}": v for k, v in ref.metrics.items()}


def training_data(stage, inputs: dict) -> DataRef | None:
    """The data a training stage trains on: the ``data`` input of a stage whose ``run`` returns a
    checkpoint (pretrain, distill); None for every other stage (importance and search read data
    to score a model, evaluate to measure one)."""
    data = inputs.get("data")
    if not isinstance(data, DataRef):
        return None
    try:
        returns = typing.get_type_hints(stage.run).get("return")
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: not known to train
        return None
    return data if isinstance(returns, type) and issubclass(returns, ModelRef) else None


def log_report(run_id: str, report: dict, name: str = "report.json") -> None:
    """An evaluation (or any) report as a JSON artifact, scrubbed."""
    client().log_dict(run_id, scrub(report), name)


def log_files(run_id: str, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
    """Plots, tables, logs: each file (or folder) as run artifacts."""
    c = client()
    for path in paths:
        path = Path(path)
        if path.is_dir():
            c.log_artifacts(run_id, str(path), artifact_path)
        else:
            c.log_artifact(run_id, str(path), artifact_path)


def log_stage_result(run_id: str, stage: str, ref, summary, recipe_digest: str = "", inputs: dict | None = None,
                     store=None) -> None:
    """What a finished stage leaves in its run: data as a run input; a checkpoint's digest, tags
    and metrics, and, for a training stage (a checkpoint made from a ``data`` input), the
    checkpoint itself as this run's logged model, which registration later finds by digest; an
    evaluation's metrics linked to the logged model of every model it measured; SDG datasets
    with their lineage; and the stage summary's metrics and files (``model/contract.py:
    Summary``, the files under ``<stage>/``). ``store`` holds the checkpoints (default: the
    configured one)."""
    inputs = inputs or {}
    if isinstance(ref, DataRef):
        log_data_ref(run_id, ref)
    elif isinstance(ref, ModelRef):
        model_id = None
        if isinstance(inputs.get("data"), DataRef):
            from registry.models import checkpoint_model

            model_id, logged_now = checkpoint_model(ref, store or open_store(), run_id)
            model_id = model_id if logged_now else None  # an earlier run's model already has its metrics
        log_model_ref(run_id, ref, model_id)
    elif callable(getattr(ref, "label_of", None)):  # an evaluation: label -> digest, label -> metrics
        from registry.models import log_evaluation

        log_evaluation(run_id, ref, store or open_store(), inputs)
    elif getattr(ref, "kind", None) == "sdg_dataset":
        from registry.sdg_tracking import log_sdg_output

        log_sdg_output(run_id, ref, recipe_digest=recipe_digest)
    if summary.metrics:
        log_metrics(run_id, summary.metrics)
    if summary.files:
        log_files(run_id, summary.files, stage)
