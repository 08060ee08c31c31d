"""The model registry: published checkpoints in, versioned and aliased MLflow models out.

    model_id, _ = checkpoint_model(ref, store, pretrain_run_id)  # the training stage's run logs its checkpoint
    log_evaluation(evaluate_run_id, evaluation, store, inputs)    # evaluation metrics linked to each logged model
    version = register_checkpoint(ref, store, "tiny", run_id=register_run_id, recipe_digest=..., data_digest=...)
    set_gate_result("tiny", version.version, passed=True)   # the evaluation gate moves @champion
    folder = resolve_checkpoint("models:/tiny@champion")    # a local, digest-checked checkpoint folder

A checkpoint is an MLflow logged model, logged with MLflow's transformers flavor straight from
its folder (the weights are copied, never loaded into memory) by the run of the stage that
made it (``pretrain``, ``distill``: ``tracking.log_stage_result``), tagged with its digest.
Registration finds that logged model by digest anywhere in the experiment and makes the
version from it, so the version's source run is the training run (whose inputs hold the
data it trained on), and its page shows the logged model's metrics: the checkpoint's own
(``checkpoint/*``) and every evaluation's (``log_evaluation``). A checkpoint no stage logged
(a recipe's ``start_from``, an untracked run) is logged by the first tracked step that needs
it: the evaluate stage's run, or registration itself.

A version's tags carry its lineage: the checkpoint digest, stage, recipe and data digests,
tokens seen, parameter count, git commit, and the parent model's name and version (found in
the registry by the parent checkpoint's digest, or given). Every new version gets the
``candidate`` alias; ``champion`` moves only through ``set_gate_result(passed=True)``.

Registration is idempotent on the checkpoint digest. Each step looks for its own earlier
result first (a version tagged with the digest, then a logged model tagged with it), so
running it again after a crash anywhere in between returns the same version, adds the
aliases that are missing, and never creates a duplicate.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import shutil
import threading
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pydantic import BaseModel

from model.contract import EXTERNAL, DataRef, ModelRef, local_folder
from model.digests import MANIFEST_NAME, combine_digests, folder_files
from model.fsutil import atomic_write_text
from registry.secrets import scrub_text
from registry.tracking import (
    checkpoint_metrics,
    client,
    configure_tracking,
    data_input,
    dataset_identity,
    ensure_experiment,
    finish_run,
    git_commit,
    log_metrics,
    metric_name,
)
from store import work_root
from store.manifest import build_manifest, local_copy_is_whole
from store.s3 import S3Store, parse_s3_uri

CANDIDATE, CHAMPION = "candidate", "champion"
DIGEST_TAG = "checkpoint_digest"
LOGGED_MODEL_NAME = "checkpoint"
MODEL_SUBDIR = "model"  # where the transformers flavor keeps the checkpoint folder's files
TASK = "text-generation"
DEFAULT_KEY_METRICS = ("val_loss", "final_loss", "tokens_seen")
_LOGGING = threading.Lock()  # _pipeline_impl_as_class swaps a module attribute: one log at a time per process


class ModelVersionRef(BaseModel):
    """A registered version, as the flow passes it on."""

    name: str
    version: str
    checkpoint_digest: str
    created: bool  # False when an earlier registration of the same checkpoint was found
    aliases: list[str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


# --------------------------------------------------------------------------------------
# Registering
# --------------------------------------------------------------------------------------


def register_checkpoint(ref: ModelRef, store, model_name: str, *, run_id: str | None = None,
                        experiment: str | None = None, recipe_digest: str = "", data_digest: str = "",
                        parent: tuple[str, str] | None = None, key_metrics: tuple[str, ...] = DEFAULT_KEY_METRICS,
                        gate_passed: bool | None = None) -> ModelVersionRef:
    """Register the published checkpoint ``ref`` as a version of ``model_name``; idempotent.

    The version is made from the checkpoint's logged model, found by digest in the experiment
    of ``run_id`` (or ``experiment``, default: the model name), and its run is the one that
    logged it: the training stage's run. When no run logged it yet, it is logged now into
    ``run_id`` (the register stage's run), or without one into a short ``register`` run.
    ``parent`` is the (name, version) it derives from; by default the first of
    ``ref.lineage.parents`` that is a registered checkpoint. ``gate_passed`` (when given) is
    passed to set_gate_result.
    """
    if ref.lineage.stage == EXTERNAL:  # a recipe's start_from: a folder as it is, hashed when the run resolved it
        if not (Path(ref.uri) / "config.json").is_file():
            raise FileNotFoundError(f"{scrub_text(ref.uri)}: the checkpoint folder is gone (no config.json)")
    elif not store.verify(ref.uri, ref.digest):
        raise ValueError(f"{scrub_text(ref.uri)} is not a whole published checkpoint with digest {ref.digest[:12]}; "
                         "publish it (store.publish) before registering")
    c = client()
    _ensure_registered_model(c, model_name)
    existing = _version_with_digest(c, model_name, ref.digest)
    if existing is not None:
        mv, created = existing, False
    else:
        experiment_id = c.get_run(run_id).info.experiment_id if run_id else ensure_experiment(experiment or model_name)
        model = _logged_model_with_digest(c, experiment_id, ref.digest)
        if model is None:
            model = c.get_logged_model(_log_for_registration(c, ref, store, model_name, run_id, experiment_id))
        tags = lineage_tags(c, ref, recipe_digest, data_digest, parent, key_metrics)
        mv = c.create_model_version(model_name, source=f"models:/{model.model_id}", run_id=model.source_run_id,
                                    tags=tags, model_id=model.model_id, description=_description(ref, tags))
        mv, created = _keep_oldest_twin(c, model_name, ref.digest, mv)
    _link_logged_model(c, mv)

    latest = max(int(v.version) for v in _search_versions(c, f"name = '{_quote(model_name)}'"))
    if (created or int(mv.version) == latest) and str(c.get_registered_model(model_name).aliases.get(CANDIDATE)) != str(mv.version):
        c.set_registered_model_alias(model_name, CANDIDATE, mv.version)
    if gate_passed is not None:
        set_gate_result(model_name, mv.version, gate_passed)
    return _version_ref(c, model_name, mv.version, created)


def _link_logged_model(c, mv) -> None:
    """The logged model's ``mlflow.modelVersions`` tag names the version, as MLflow's server and
    fluent ``register_model`` leave it (the UI links the model to its versions through it); a
    client on the embedded SQLite store writes it here. Idempotent."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    model_id = (mv.source or "").removeprefix("models:/")
    if not model_id.startswith("m-") or "/" in model_id:
        return
    linked = json.loads(c.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    if not any(e.get("name") == mv.name and str(e.get("version")) == str(mv.version) for e in linked):
        entry = {"name": mv.name, "version": int(mv.version)}  # as the server writes it
        c.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*linked, entry])})


def _log_for_registration(c, ref: ModelRef, store, model_name: str, run_id: str | None, experiment_id: str) -> str:
    """Log a checkpoint no stage logged into ``run_id``, or into a ``register`` run of its own."""
    own_run = run_id is None
    if own_run:
        run_id = c.create_run(experiment_id, run_name=f"register {model_name}",
                              tags={"factory.kind": "register"}).info.run_id
    try:
        model_id, _ = checkpoint_model(ref, store, run_id, with_metrics=True)
    except BaseException:
        if own_run:
            finish_run(run_id, "FAILED")
        raise
    if own_run:
        finish_run(run_id)
    return model_id


def checkpoint_model(ref: ModelRef, store, run_id: str, *, with_metrics: bool = False) -> tuple[str, bool]:
    """The logged model of checkpoint ``ref``: the one logged before in ``run_id``'s experiment
    (by any run: found by digest), else logged now, as an output of ``run_id``. Returns (its
    id, whether it was logged now). ``with_metrics``: a model logged now gets the checkpoint's
    metrics (``checkpoint/<name>``, logged into ``run_id``), as ``tracking.log_model_ref`` does
    for a training stage's run."""
    c = client()
    experiment_id = c.get_run(run_id).info.experiment_id
    found = _logged_model_with_digest(c, experiment_id, ref.digest)
    if found is not None:
        return found.model_id, False
    model_id = _log_checkpoint(c, local_folder(store, ref), run_id, experiment_id, ref.digest)
    if with_metrics:
        log_metrics(run_id, checkpoint_metrics(ref), model_id=model_id)
    return model_id, True


def log_evaluation(run_id: str, evaluation, store, inputs: dict) -> dict[str, str]:
    """An evaluation's metrics on the logged models it measured, so each registered version's
    page shows them. ``evaluation`` is the evaluate stage's ref (``models``: label -> checkpoint
    digest, ``metrics``: label -> scalars), ``inputs`` that stage's inputs (the ModelRefs, by
    digest, and the ``data`` it measured on).

    ``run_id`` (the evaluate stage's run) gets every measured model as a model input; each
    model's metrics go, under their own names (``val_loss``, ``kl``, ...: comparable across
    models and versions), into a run of its own nested under ``run_id`` ("evaluate <label>"),
    linked to the model (``model_id``) and to the data. Metrics a model already holds with the
    same value (an evaluation run again) are not logged twice. Returns label -> model id."""
    from mlflow.entities import LoggedModelInput

    refs = {}
    for value in inputs.values():
        for ref in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(ref, ModelRef):
                refs[ref.digest] = ref
    data = inputs.get("data") if isinstance(inputs.get("data"), DataRef) else None
    dataset_digest = dataset_identity(data)[1] if data is not None else None
    c = client()
    linked = {}
    for label, digest in evaluation.models.items():
        metrics = {metric_name(k): float(v) for k, v in evaluation.metrics.get(label, {}).items()
                   if isinstance(v, (int, float)) and math.isfinite(v)}
        if digest not in refs or not metrics:
            continue
        model_id, _ = checkpoint_model(refs[digest], store, run_id, with_metrics=True)
        linked[label] = model_id
        held = {(m.key, m.value, m.dataset_digest) for m in c.get_logged_model(model_id).metrics or []}
        todo = {k: v for k, v in metrics.items() if (k, v, dataset_digest) not in held}
        if not todo:
            continue
        child = _nested_run(c, run_id, f"evaluate {label}", {"factory.kind": "evaluation", "factory.model_label": label,
                                                              "factory.checkpoint_digest": digest,
                                                              "factory.model_id": model_id})
        try:
            c.log_inputs(child, datasets=[data_input(data, "evaluation")] if data is not None else None,
                         models=[LoggedModelInput(model_id)])
            log_metrics(child, todo, model_id=model_id, dataset=data)
        except BaseException:
            finish_run(child, "FAILED")
            raise
        finish_run(child)
    if linked:
        c.log_inputs(run_id, models=[LoggedModelInput(m) for m in dict.fromkeys(linked.values())])
    return linked


def _nested_run(c, parent_run_id: str, name: str, tags: dict[str, str]) -> str:
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    parent = c.get_run(parent_run_id)
    tags = {MLFLOW_PARENT_RUN_ID: parent_run_id, "factory.recipe": parent.data.tags.get("factory.recipe", ""), **tags}
    return c.create_run(parent.info.experiment_id, run_name=name, tags=tags).info.run_id


def set_gate_result(model_name: str, version: str, passed: bool, metrics: dict[str, float] | None = None) -> None:
    """Record the evaluation gate on a version (``eval_status`` and ``metric.*`` tags);
    move ``champion`` to it only when the gate passed."""
    c = client()
    for name, value in (metrics or {}).items():
        c.set_model_version_tag(model_name, str(version), f"metric.{metric_name(name)}", f"{value:.6g}")
    c.set_model_version_tag(model_name, str(version), "eval_status", "passed" if passed else "failed")
    if passed:
        c.set_registered_model_alias(model_name, CHAMPION, str(version))


def lineage_tags(c, ref: ModelRef, recipe_digest: str = "", data_digest: str = "",
                 parent: tuple[str, str] | None = None,
                 key_metrics: tuple[str, ...] = DEFAULT_KEY_METRICS) -> dict[str, str]:
    """The tags a version carries: where it came from and what it is."""
    parent = parent or _registered_parent(c, ref.lineage.parents)
    tags = {
        DIGEST_TAG: ref.digest,
        "checkpoint_uri": scrub_text(ref.uri),
        "stage": ref.lineage.stage,
        "recipe": ref.lineage.recipe_name,
        "recipe_digest": recipe_digest,
        "spec_digest": ref.lineage.spec_digest,
        "code_digest": ref.lineage.code_digest,
        "data_digest": data_digest,
        "parent_digests": ",".join(ref.lineage.parents),
        "parent_model": parent[0] if parent else "",
        "parent_version": str(parent[1]) if parent else "",
        "family": ref.architecture.family,
        "parameters": str(ref.architecture.parameters),
        "layer_pattern": ref.architecture.layer_pattern,
        "tokens_seen": str(int(ref.metrics["tokens_seen"])) if "tokens_seen" in ref.metrics else "",
        "git_commit": git_commit(),
    }
    tags |= {f"metric.{metric_name(k)}": f"{ref.metrics[k]:.6g}" for k in key_metrics if k in ref.metrics}
    return {k: v for k, v in tags.items() if v}


def _description(ref: ModelRef, tags: dict[str, str]) -> str:
    parent = f" from {tags['parent_model']} v{tags['parent_version']}" if "parent_model" in tags else ""
    return (f"{ref.lineage.stage} of recipe {ref.lineage.recipe_name or '?'}{parent}: {ref.architecture.family}, "
            f"{ref.architecture.parameters:,} parameters, layers {ref.architecture.layer_pattern}")


@contextlib.contextmanager
def _pipeline_impl_as_class() -> Iterator[None]:
    """MLflow (3.17, 3.18) logs a checkpoint folder by reading ``check_task(task)[1]["impl"].__name__``;
    transformers 5 keeps a dotted path string there, so logging fails with "'str' object has
    no attribute '__name__'". While logging, hand MLflow the class that string names."""
    from transformers import pipelines

    original = pipelines.check_task
    if not isinstance(original(TASK)[1].get("impl"), str):
        yield
        return

    def check_task(task):
        name, meta, options = original(task)
        if isinstance(meta.get("impl"), str):
            module, _, cls = meta["impl"].rpartition(".")
            meta = {**meta, "impl": getattr(importlib.import_module(module), cls)}
        return name, meta, options

    pipelines.check_task = check_task
    try:
        yield
    finally:
        pipelines.check_task = original


def _pip_requirements() -> list[str]:
    """What loading needs, pinned to what wrote it (MLflow cannot infer them from a folder
    without loading the model, and its defaults ask for torchvision)."""
    pins = []
    for package in ("transformers", "torch", "safetensors", "tokenizers"):
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def _log_checkpoint(c, folder: Path, run_id: str, experiment_id: str, digest: str) -> str:
    """Log a checkpoint folder with the transformers flavor (files copied, weights never loaded)
    as a logged model of ``run_id`` (its source run, and an output of it)."""
    import mlflow.transformers
    from mlflow.entities import LoggedModelOutput

    configure_tracking()
    # Created here, in the run's experiment: left to itself, log_model files the model under
    # the process's active experiment (usually Default), whatever run it belongs to.
    logged = c.create_logged_model(experiment_id, name=LOGGED_MODEL_NAME, source_run_id=run_id,
                                   tags={DIGEST_TAG: digest})
    # No run_id here: given one, log_model also copies every metric the run holds at step 0 onto
    # the model (system metrics included), reading each metric's whole history to find them.
    with _LOGGING, _pipeline_impl_as_class():
        info = mlflow.transformers.log_model(transformers_model=str(folder), task=TASK, name=LOGGED_MODEL_NAME,
                                             model_id=logged.model_id, pip_requirements=_pip_requirements())
    c.log_outputs(run_id, [LoggedModelOutput(info.model_id, step=0)])
    return info.model_id


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def _search_versions(c, filter_string: str) -> list:
    versions, token = [], None
    while True:
        page = c.search_model_versions(filter_string, max_results=1000, page_token=token)
        versions += list(page)
        token = page.token
        if not token:
            return versions


def _ensure_registered_model(c, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException:
        with contextlib.suppress(MlflowException):  # created by a concurrent caller: fine
            c.create_registered_model(name, tags={"factory.kind": "model"})


def _version_with_digest(c, name: str, digest: str):
    versions = _search_versions(c, f"name = '{_quote(name)}' and tags.{DIGEST_TAG} = '{digest}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _keep_oldest_twin(c, name: str, digest: str, mv):
    """Two registrations racing on the same checkpoint both create a version: the younger
    one deletes its own, so exactly one remains."""
    oldest = _version_with_digest(c, name, digest)
    if oldest is not None and int(oldest.version) < int(mv.version):
        c.delete_model_version(name, mv.version)
        return oldest, False
    return mv, True


def _logged_model_with_digest(c, experiment_id: str, digest: str):
    """The first whole (READY) logged model of this checkpoint in the experiment: logged by the
    stage that made it, an evaluation, or an interrupted registration. None when there is none
    (a crash mid-upload leaves one PENDING or FAILED: not whole)."""
    models, token = [], None
    while True:
        page = c.search_logged_models([experiment_id], filter_string=f"tags.{DIGEST_TAG} = '{digest}'",
                                      page_token=token)
        models += [m for m in page if str(m.status) == "READY"]
        token = page.token
        if not token:
            return min(models, key=lambda m: m.creation_timestamp) if models else None


def _registered_parent(c, parent_digests: list[str]) -> tuple[str, str] | None:
    for digest in parent_digests:
        versions = _search_versions(c, f"tags.{DIGEST_TAG} = '{digest}'")
        if versions:
            first = min(versions, key=lambda v: int(v.version))
            return first.name, first.version
    return None


def _version_ref(c, name: str, version: str, created: bool) -> ModelVersionRef:
    mv = c.get_model_version(name, version)
    aliases = [a for a, v in c.get_registered_model(name).aliases.items() if str(v) == str(version)]
    return ModelVersionRef(name=name, version=str(version), checkpoint_digest=mv.tags.get(DIGEST_TAG, ""),
                           created=created, aliases=sorted(aliases))


# --------------------------------------------------------------------------------------
# Finding and fetching
# --------------------------------------------------------------------------------------


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` / ``NAME@ALIAS`` -> (name, alias, None); ``models:/NAME/3`` -> (name, None, "3")."""
    text = uri.removeprefix("models:/")
    if "@" in text:
        name, _, alias = text.partition("@")
        if name and alias:
            return name, alias, None
    elif "/" in text:
        name, _, number = text.rpartition("/")
        if name and number.isdigit():
            return name, None, number
    raise ValueError(f"not a model reference: {uri!r}; expected NAME@ALIAS or NAME/VERSION (optionally models:/...)")


def get_version(uri: str):
    """The MLflow ModelVersion that ``uri`` (NAME@ALIAS or NAME/VERSION) points at; a clear error if none."""
    from mlflow.exceptions import MlflowException

    name, alias, number = parse_model_uri(uri)
    c = client()
    try:
        return c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, number)
    except MlflowException as e:
        known = [m.name for m in c.search_registered_models(max_results=50)]
        raise LookupError(f"no model version {uri!r} in {scrub_text(configure_tracking())} "
                          f"({e.error_code}); registered models: {', '.join(known) or 'none'}") from None


def version_ref(uri: str) -> ModelVersionRef:
    """The registered version ``uri`` (NAME@ALIAS or NAME/VERSION) points at, as the flow passes it on."""
    mv = get_version(uri)
    return _version_ref(client(), mv.name, mv.version, created=False)


def resolve_checkpoint(uri: str, store=None) -> Path:
    """A local checkpoint folder for ``uri``: a folder as is, ``s3://...`` fetched through the
    store, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` downloaded from the registry
    (once per checkpoint digest, checked against it)."""
    if uri.startswith("models:/"):
        return _download_version(get_version(uri))
    if uri.startswith("s3://"):
        store = store if isinstance(store, S3Store) else S3Store(f"s3://{parse_s3_uri(uri)[0]}")
        return store.fetch(uri)
    folder = Path(uri).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{uri} is not a checkpoint folder (no config.json), an s3:// URI or models:/NAME@ALIAS")
    return folder


def _download_version(mv) -> Path:
    import mlflow.artifacts

    digest = mv.tags.get(DIGEST_TAG)
    dest = work_root() / "models" / (digest or f"{mv.name}-v{mv.version}")
    if digest and local_copy_is_whole(dest, digest):
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}",
                                                          dst_path=str(partial), tracking_uri=configure_tracking()))
    folder = downloaded / MODEL_SUBDIR
    if digest and combine_digests(folder_files(folder)) != digest:
        shutil.rmtree(partial, ignore_errors=True)
        raise ValueError(f"models:/{mv.name}/{mv.version}: downloaded files do not match checkpoint digest "
                         f"{digest[:12]}; the artifact store holds a damaged copy")
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(build_manifest(folder), indent=1))
    folder.rename(dest)
    shutil.rmtree(partial, ignore_errors=True)
    return dest


def download_model(uri: str, out_dir: str | Path) -> Path:
    """``factory models get``: the checkpoint of ``uri`` copied into a new (or empty) ``out_dir``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new folder")
    source = resolve_checkpoint(uri if uri.startswith("models:/") else f"models:/{uri}")
    shutil.copytree(source, out_dir, dirs_exist_ok=True)
    return out_dir


def list_models(name: str | None = None) -> list[dict]:
    """One row per version: name, version, aliases, key metrics (``metric.*`` tags), lineage."""
    c = client()
    filter_string = f"name = '{_quote(name)}'" if name else None
    registered, token = [], None
    while True:
        page = c.search_registered_models(filter_string=filter_string, max_results=1000, page_token=token)
        registered += list(page)
        token = page.token
        if not token:
            break
    rows = []
    for model in sorted(registered, key=lambda m: m.name):
        aliases: dict[str, list[str]] = {}
        for alias, number in model.aliases.items():
            aliases.setdefault(str(number), []).append(alias)
        for mv in sorted(_search_versions(c, f"name = '{_quote(model.name)}'"), key=lambda v: int(v.version)):
            tags = mv.tags
            rows.append({
                "name": model.name, "version": str(mv.version), "aliases": sorted(aliases.get(str(mv.version), [])),
                "metrics": {k.removeprefix("metric."): v for k, v in sorted(tags.items()) if k.startswith("metric.")},
                "stage": tags.get("stage", ""), "parameters": tags.get("parameters", ""),
                "tokens_seen": tags.get("tokens_seen", ""), "eval_status": tags.get("eval_status", ""),
                "parent": f"{tags['parent_model']}/{tags['parent_version']}" if tags.get("parent_model") else "",
                "digest": tags.get(DIGEST_TAG, ""), "data_digest": tags.get("data_digest", ""),
                "git_commit": tags.get("git_commit", ""),
            })
    return rows
