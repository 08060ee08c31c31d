"""Tracking and the model registry against real servers on 127.0.0.1: an ``mlflow server``
(SQLite backend, artifacts proxied to S3 on moto) and the S3 artifact store on moto.

The embedded default (SQLite file, local folders, no server) is in test_registry_embedded.py.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import boto3
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flows.cli import main
from flows.recipe import parse_recipe
from model import pretrain_stage
from model.architectures import build_model_config, get_family
from model.contract import ArchSummary, DataRef, Lineage, ModelRef, StageContext, Summary
from model.digests import json_digest
from model.spec import ModelSpec
from model.tokenizer import load_tokenizer, train_bpe
from registry import models, tracking
from registry.secrets import REDACTED, is_secret_key, scrub, scrub_text
from store import open_store
from store.s3 import S3Store

from .conftest import MLFLOW_ARTIFACT_BUCKET, prepare_data, recipe_dict, run_factory


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def tokenizer_dir(corpus_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    texts = [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))[:12]]
    train_bpe(texts, 512).save_pretrained(folder)
    return folder


def micro_checkpoint(folder: Path, tokenizer_dir: Path, seed: int) -> dict:
    """A randomly initialised ``micro`` Nemotron-H with its tokenizer, saved; returns its summary."""
    tokenizer = load_tokenizer(tokenizer_dir)
    config = build_model_config(ModelSpec(preset="micro"), tokenizer)
    torch.manual_seed(seed)
    family = get_family("nemotron_h")
    family.model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return family.summarize(config)


def published_ref(store, folder: Path, key: str, summary: dict, stage: str, parents: list[str],
                  metrics: dict[str, float] | None = None) -> ModelRef:
    uri = store.publish(folder, key)
    return ModelRef(uri=uri, digest=store.published_digest(uri), architecture=ArchSummary(**summary),
                    lineage=Lineage(stage=stage, spec_digest=json_digest({"stage": stage}), code_digest="test",
                                    parents=parents, recipe_name="micro"),
                    metrics=metrics or {"val_loss": 6.1, "final_loss": 6.0, "tokens_seen": 2048.0})


@pytest.fixture
def server_store(mlflow_server, s3_env, tmp_path, monkeypatch) -> S3Store:
    """MLFLOW_TRACKING_URI on the session's mlflow server; FACTORY_ARTIFACT_ROOT on a fresh bucket."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    bucket = unique("factory")
    boto3.client("s3").create_bucket(Bucket=bucket)
    monkeypatch.setenv("FACTORY_ARTIFACT_ROOT", f"s3://{bucket}/factory")
    monkeypatch.setenv("FACTORY_WORK_DIR", str(tmp_path / "work"))
    return open_store()


def versions_of(name: str) -> list:
    return tracking.client().search_model_versions(f"name = '{name}'")


def aliases(name: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in tracking.client().get_registered_model(name).aliases.items()}


# --------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------


@pytest.mark.slow  # data preparation, 4 training steps, a `factory` subprocess
def test_pretrained_checkpoint_on_s3_is_tracked_registered_listed_fetched_and_loads(server_store, corpus_dir,
                                                                                     tmp_path, capsys):
    store = server_store
    name = unique("micro")
    recipe = parse_recipe(recipe_dict(corpus_dir, name="micro", train={"steps": 4, "checkpoint_every": 2,
                                                                       "eval_every": 2}))
    with tracking.factory_run(recipe, experiment=name) as run_id:
        data = prepare_data(recipe.data, recipe.tokenizer, store, recipe.name)
        with tracking.stage_run(run_id, "pretrain", params=recipe.pretrain_spec().model_dump(mode="json"),
                                system_metrics=False) as pretrain_run:
            tracking.log_data_ref(pretrain_run, data)
            ref = pretrain_stage.run(recipe.pretrain_spec(), {"data": data}, store,
                                     StageContext(recipe.name, on_step=(tracking.metrics_callback(pretrain_run),)))
            tracking.log_model_ref(pretrain_run, ref)
        with tracking.stage_run(run_id, "register", system_metrics=False) as register_run:
            version = models.register_checkpoint(ref, store, name, run_id=register_run,
                                                 recipe_digest=json_digest(recipe), data_digest=data.digest)
    assert ref.uri.startswith(f"{store.root}/pretrain/") and data.uri.startswith(f"{store.root}/data/")
    assert version.version == "1" and version.created and version.aliases == ["candidate"]
    models.set_gate_result(name, version.version, passed=True, metrics={"eval_loss": 5.25})

    # What MLflow holds: the recipe as parameters, one loss per step, the data with its digest.
    c = tracking.client()
    parent, pretrain = c.get_run(run_id), c.get_run(pretrain_run)
    assert parent.data.params["train.steps"] == "4" and parent.data.params["model.preset"] == "micro"
    assert pretrain.data.tags["mlflow.parentRunId"] == run_id and pretrain.info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(pretrain_run, "loss")] == [1, 2, 3, 4]
    assert [m.step for m in c.get_metric_history(pretrain_run, "val_loss")] == [2, 4]
    assert pretrain.data.metrics["checkpoint/val_loss"] == ref.metrics["val_loss"]
    assert pretrain.data.tags["factory.checkpoint_digest"] == ref.digest
    (data_input,) = pretrain.inputs.dataset_inputs
    assert {t.key: t.value for t in data_input.tags}["factory.digest"] == data.digest
    assert data_input.dataset.digest == data.digest[:32]
    mv = c.get_model_version(name, "1")
    assert mv.tags["checkpoint_digest"] == ref.digest and mv.tags["data_digest"] == data.digest
    assert mv.tags["recipe_digest"] == json_digest(recipe) and mv.tags["tokens_seen"] == str(4 * 8 * 64)
    assert mv.tags["parameters"] == str(ref.architecture.parameters) and mv.tags["stage"] == "pretrain"
    assert len(mv.tags["git_commit"]) >= 40 and mv.run_id == register_run

    # The weights went through the server to its S3 artifact destination.
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=MLFLOW_ARTIFACT_BUCKET)["Contents"]]
    assert any(k.endswith("/model/model.safetensors") for k in keys)

    listed = run_factory("models", "list", name, "--metrics", "eval_loss", root=store.root).stdout.splitlines()
    assert listed[0].split()[:3] == ["MODEL", "VERSION", "ALIASES"] and listed[0].split()[7] == "EVAL_LOSS"
    row = listed[1].split()
    assert row[:4] == [name, "1", "candidate,champion", "pretrain"] and row[6:8] == ["passed", "5.25"]
    out = tmp_path / "got"
    assert main(["models", "get", f"{name}@champion", str(out)]) == 0  # in-process: `list` above ran as a command
    assert capsys.readouterr().out.strip().endswith(str(out))
    assert json.loads((out / "manifest.json").read_text())["digest"] == ref.digest
    tokenizer, net = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer("def main(", return_tensors="pt").input_ids
    assert type(net).__name__ == "NemotronHForCausalLM"
    assert net.generate(ids, max_new_tokens=5, do_sample=False).shape[1] > ids.shape[1]

    import mlflow.transformers

    tracking.configure_tracking()
    pipeline = mlflow.transformers.load_model(f"models:/{name}@champion")
    generated = pipeline("def main(", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert generated.startswith("def main(") and len(generated) > len("def main(")


def test_student_version_points_at_its_teacher(server_store, tokenizer_dir, tmp_path):
    store = server_store
    teacher_name, student_name = unique("teacher"), unique("student")
    data_digest = "d" * 64
    teacher = published_ref(store, tmp_path / "teacher", "pretrain/teacher/model",
                            micro_checkpoint(tmp_path / "teacher", tokenizer_dir, seed=0), "pretrain", [data_digest])
    student = published_ref(store, tmp_path / "student", "distill/student/model",
                            micro_checkpoint(tmp_path / "student", tokenizer_dir, seed=1), "distill",
                            [teacher.digest, data_digest])
    assert student.digest != teacher.digest
    models.register_checkpoint(teacher, store, teacher_name, data_digest=data_digest)
    version = models.register_checkpoint(student, store, student_name, data_digest=data_digest)

    tags = tracking.client().get_model_version(student_name, version.version).tags
    assert (tags["parent_model"], tags["parent_version"]) == (teacher_name, "1")
    assert tags["stage"] == "distill" and tags["parent_digests"] == f"{teacher.digest},{data_digest}"
    (row,) = models.list_models(student_name)
    assert row["parent"] == f"{teacher_name}/1" and row["aliases"] == ["candidate"]
    assert row["metrics"] == {"final_loss": "6", "tokens_seen": "2048", "val_loss": "6.1"}


def _crash(*args, **kwargs):
    raise RuntimeError("simulated crash")


def test_a_version_shows_its_training_run_with_its_data_and_its_evaluation_metrics(server_store, tokenizer_dir,
                                                                                   tmp_path, mlflow_server,
                                                                                   monkeypatch):
    """What a registry user expects, read back through MlflowClient alone: a version's source run
    is the stage run that trained the checkpoint (with the data it trained on as its input and
    the checkpoint as its logged model), and the logged model the version points at holds the
    evaluation's metrics. The stage runs are made here as tasks/stage_task.py makes them."""
    from mlflow import MlflowClient

    from compression import distill_stage
    from evaluation import evaluate_stage
    from evaluation.gate import GateResult
    from registry import register_stage

    store = server_store
    name = unique("lineage")
    data = DataRef(uri=f"{store.root}/data/micro-x", digest="a" * 64, tokenizer_uri="/t", tokenizer_digest="t" * 64,
                   source="builtin:stdlib", source_digest="s" * 64, seq_len=64, train_tokens=5000,
                   validation_tokens=500, lineage=Lineage(stage="data", spec_digest="a", code_digest="b"))
    teacher = published_ref(store, tmp_path / "teacher", "pretrain/micro-t/model",
                            micro_checkpoint(tmp_path / "teacher", tokenizer_dir, seed=40), "pretrain", [data.digest])
    student = published_ref(store, tmp_path / "student", "distill/micro-s/model",
                            micro_checkpoint(tmp_path / "student", tokenizer_dir, seed=41), "distill",
                            [teacher.digest, data.digest], metrics={"val_loss": 6.4, "tokens_seen": 4096.0})
    label = "micro-s"
    evaluation = evaluate_stage.Evaluation(
        uri=f"{store.root}/evaluate/micro-e/report", digest="e" * 64, teacher="teacher",
        lineage=Lineage(stage="evaluate", spec_digest="x", code_digest="y"),
        models={"teacher": teacher.digest, label: student.digest},
        metrics={"teacher": {"val_loss": 5.5, "decode_tokens_per_s@b1_L32": 900.0},
                 label: {"val_loss": 5.75, "kl": 0.25, "decode_tokens_per_s@b1_L32": 1500.0}},
        gates={label: GateResult(passed=True, checks=[])})
    evaluate_inputs = {"teacher": teacher, "models": [student], "data": data}

    def training_stage(parent: str, stage, ref: ModelRef, inputs: dict) -> str:
        with tracking.stage_run(parent, stage.NAME, system_metrics=False) as run:
            tracking.log_data_ref(run, tracking.training_data(stage, inputs))  # _tracked, at the start
            tracking.log_stage_result(run, stage.NAME, ref, Summary(), inputs=inputs, store=store)  # _run, at the end
        return run

    with tracking.factory_run({"name": "micro"}, experiment=name) as run_id:
        pretrain_run = training_stage(run_id, pretrain_stage, teacher, {"data": data})
        distill_run = training_stage(run_id, distill_stage, student, {"student": teacher, "teacher": teacher,
                                                                      "data": data})
        with tracking.stage_run(run_id, "evaluate", system_metrics=False) as evaluate_run:
            assert tracking.training_data(evaluate_stage, evaluate_inputs) is None  # measures, trains nothing
            summary = Summary(metrics={f"{m}/{k}": v for m, values in evaluation.metrics.items() for k, v in values.items()})
            tracking.log_stage_result(evaluate_run, "evaluate", evaluation, summary, inputs=evaluate_inputs, store=store)
        with monkeypatch.context() as m:  # a crash before the version exists: the retry below makes it all the same
            m.setattr(MlflowClient, "create_model_version", _crash)
            with pytest.raises(RuntimeError, match="simulated crash"):
                models.register_checkpoint(teacher, store, f"{name}-teacher", experiment=name)
        versions = {}
        for model_name, ref, extra in ((f"{name}-teacher", teacher, {}), (name, student, {"evaluation": evaluation})):
            with tracking.stage_run(run_id, "register", system_metrics=False) as register_run:
                spec = register_stage.RegistrationSpec(model_name=model_name, experiment=name)
                versions[model_name] = register_stage.run(spec, {"model": ref, "data": data, **extra}, store,
                                                          StageContext("micro", parent_run=register_run))

    c = MlflowClient(mlflow_server)
    for model_name, ref, trained_by, stage in ((name, student, distill_run, "distill"),
                                               (f"{name}-teacher", teacher, pretrain_run, "pretrain")):
        mv = c.get_model_version(model_name, versions[model_name].version)
        # The version page's "Source Run": the training stage's run, nested under the factory's run, with its data.
        assert mv.run_id == trained_by and mv.tags["checkpoint_digest"] == ref.digest
        # Its "Source Model": the logged model in its source, models:/<model id> (this backend keeps no model_id).
        model_id = mv.source.removeprefix("models:/")
        assert model_id.startswith("m-") and mv.model_id in (None, model_id)
        run = c.get_run(mv.run_id)
        assert run.info.run_name == stage and run.data.tags["mlflow.parentRunId"] == run_id
        (data_input,) = run.inputs.dataset_inputs
        assert data_input.dataset.digest == data.digest[:32]
        assert {t.key: t.value for t in data_input.tags} == {"mlflow.data.context": "training",
                                                             "factory.digest": data.digest}
        assert [o.model_id for o in run.outputs.model_outputs] == [model_id]
        # The logged model the version was made from: this run's, with the checkpoint's and the evaluation's metrics.
        model = c.get_logged_model(model_id)
        assert model.source_run_id == trained_by and model.tags["checkpoint_digest"] == ref.digest
        assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": model_name, "version": int(mv.version)}]
        metrics = {m.key: m for m in model.metrics}
        assert {k: metrics[f"checkpoint/{k}"].value for k in ref.metrics} == ref.metrics
        label_of = evaluation.label_of(ref.digest)
        measured = {tracking.metric_name(k): v for k, v in evaluation.metrics[label_of].items()}
        assert {k: metrics[k].value for k in measured} == measured
        assert {metrics[k].dataset_digest for k in measured} == {data.digest[:32]}
        eval_run = c.get_run(metrics["val_loss"].run_id)  # each model's evaluation: a run under the evaluate run
        assert eval_run.data.tags["mlflow.parentRunId"] == evaluate_run and eval_run.info.run_name == f"evaluate {label_of}"
        assert [i.model_id for i in eval_run.inputs.model_inputs] == [model_id]
        (eval_data,) = eval_run.inputs.dataset_inputs
        assert {t.key: t.value for t in eval_data.tags}["mlflow.data.context"] == "evaluation"
    student_version = c.get_model_version(name, versions[name].version)
    assert student_version.tags["eval_status"] == "passed" and student_version.tags["metric.kl"] == "0.25"
    assert student_version.tags["parent_model"] == f"{name}-teacher"
    assert {i.model_id for i in c.get_run(evaluate_run).inputs.model_inputs} == \
        {c.get_model_version(n, v.version).source.removeprefix("models:/") for n, v in versions.items()}
    # One logged model per checkpoint: registration made none of its own, and its runs hold no model.
    experiment_id = c.get_experiment_by_name(name).experiment_id
    assert len(c.search_logged_models([experiment_id])) == 2
    registers = c.search_runs([experiment_id], "attributes.run_name = 'register'")
    assert len(registers) == 2 and not any(r.outputs.model_outputs for r in registers)

    # The evaluation and the registration run again (a retried flow): nothing is added twice.
    model_id = student_version.source.removeprefix("models:/")
    held = len(c.get_logged_model(model_id).metrics)
    with tracking.factory_run({"name": "micro"}, experiment=name) as again, \
            tracking.stage_run(again, "evaluate", system_metrics=False) as evaluate_again:
        tracking.log_stage_result(evaluate_again, "evaluate", evaluation, Summary(), inputs=evaluate_inputs, store=store)
    assert len(c.get_logged_model(model_id).metrics) == held
    assert models.register_checkpoint(student, store, name, experiment=name).created is False
    assert len(c.search_logged_models([experiment_id])) == 2


def test_registration_is_idempotent_and_survives_crashes_between_steps(server_store, tokenizer_dir, tmp_path,
                                                                       monkeypatch):
    from mlflow import MlflowClient

    store = server_store
    name = unique("idem")
    refs = [published_ref(store, tmp_path / f"ckpt{i}", f"pretrain/ckpt{i}/model",
                          micro_checkpoint(tmp_path / f"ckpt{i}", tokenizer_dir, seed=20 + i), "pretrain", ["d" * 64])
            for i in range(3)]

    first = models.register_checkpoint(refs[0], store, name)
    again = models.register_checkpoint(refs[0], store, name)
    assert (first.version, first.created) == ("1", True) and (again.version, again.created) == ("1", False)
    assert len(versions_of(name)) == 1

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    def logged_models_of(digest: str) -> list:
        c = tracking.client()  # registrations without a run log into the experiment named after the model
        return c.search_logged_models([c.get_experiment_by_name(name).experiment_id],
                                      filter_string=f"tags.checkpoint_digest = '{digest}'")

    # Crash after the checkpoint was logged, before its version exists: the retry reuses the logged model.
    with monkeypatch.context() as m:
        m.setattr(MlflowClient, "create_model_version", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            models.register_checkpoint(refs[1], store, name)
    assert len(versions_of(name)) == 1 and len(logged_models_of(refs[1].digest)) == 1
    second = models.register_checkpoint(refs[1], store, name)
    assert (second.version, second.created, second.aliases) == ("2", True, ["candidate"])
    assert len(logged_models_of(refs[1].digest)) == 1

    # Crash after the version was created, before it got its alias: the retry finds it and aliases it.
    with monkeypatch.context() as m:
        m.setattr(MlflowClient, "set_registered_model_alias", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            models.register_checkpoint(refs[2], store, name)
    assert aliases(name) == {"candidate": "2"}
    third = models.register_checkpoint(refs[2], store, name)
    assert (third.version, third.created, third.aliases) == ("3", False, ["candidate"])
    assert sorted(int(v.version) for v in versions_of(name)) == [1, 2, 3]
    assert models.register_checkpoint(refs[0], store, name).aliases == []  # an old one: candidate stays on v3


def test_champion_moves_only_when_the_gate_passes(server_store, tokenizer_dir, tmp_path):
    store = server_store
    name = unique("gate")
    first, second = (published_ref(store, tmp_path / f"c{i}", f"distill/c{i}/model",
                                   micro_checkpoint(tmp_path / f"c{i}", tokenizer_dir, seed=10 + i), "distill", [])
                     for i in range(2))
    v1 = models.register_checkpoint(first, store, name, gate_passed=True)
    assert v1.aliases == ["candidate", "champion"]
    v2 = models.register_checkpoint(second, store, name)
    assert aliases(name) == {"candidate": "2", "champion": "1"}
    models.set_gate_result(name, v2.version, passed=False, metrics={"eval_loss": 9.0})
    assert aliases(name) == {"candidate": "2", "champion": "1"}
    assert tracking.client().get_model_version(name, "2").tags["eval_status"] == "failed"
    models.set_gate_result(name, v2.version, passed=True)
    assert aliases(name) == {"candidate": "2", "champion": "2"}
    assert models.resolve_checkpoint(f"models:/{name}@champion").name == second.digest
    with pytest.raises(LookupError, match=f"no model version 'models:/{name}@nope'"):
        models.resolve_checkpoint(f"models:/{name}@nope")


# --------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------

AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"
HF_TOKEN = "hf_" + "Q7x" * 12
URI_PASSWORD = "pa55w0rd-in-a-uri"
API_KEY = "sk-live-0123456789abcdefghijKLMN"
REPORT_PASSWORD = "report-password-98765"
SIGNATURE = "5f1d0c0ffee5ca1ab1e"
SECRETS = (AWS_SECRET, HF_TOKEN, URI_PASSWORD, API_KEY, REPORT_PASSWORD, SIGNATURE)


def test_scrubbing_survives_another_thread_changing_the_environment(monkeypatch):
    """MLflow's telemetry thread sets and unsets a variable; iterating os.environ meanwhile raised
    KeyError in the middle of a factory run."""
    import os
    import sys
    import threading

    stop = threading.Event()

    def toggle():
        while not stop.is_set():
            os.environ["_FACTORY_TEST_TOGGLE"] = "x"
            os.environ.pop("_FACTORY_TEST_TOGGLE", None)

    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    thread, interval = threading.Thread(target=toggle), sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the old code failed ~1 call in 4
    thread.start()
    try:
        for _ in range(2000):
            assert scrub_text(f"pulled with {HF_TOKEN}") == "pulled with ***"
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)


def test_scrub_redacts_secrets_and_keeps_everything_else(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "from-the-environment-1")
    value = {
        "data": {"source": f"https://alice:{URI_PASSWORD}@data.example.com/corpus.jsonl", "seq_len": 256},
        "tokenizer": {"vocab_size": 4096, "path": "/models/tokenizer"},
        "sdg": {"api_key": API_KEY, "apiKey": "other-key-value", "endpoint": "https://x.io/v1?api_key=abc&model=m",
                "headers": {"Authorization": "Bearer abcdefghijklmnopqrstuvwxyz012345"}},
        "notes": [f"token {HF_TOKEN}", "uses from-the-environment-1", "AKIAIOSFODNN7EXAMPLE is a key id"],
        "presigned": f"https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA/x&X-Amz-Signature={SIGNATURE}&x-id=GetObject",
        "tokens_seen": 1234, "max_new_tokens": 64, "hf_token": None,
        "digest": "ab" * 32, "s3": "s3://bucket/prefix/model",
    }
    clean = scrub(value)
    text = json.dumps(clean)
    for secret in (URI_PASSWORD, API_KEY, "other-key-value", HF_TOKEN, "from-the-environment-1",
                   "AKIAIOSFODNN7EXAMPLE", SIGNATURE, "abcdefghijklmnopqrstuvwxyz012345"):
        assert secret not in text
    assert clean["data"] == {"source": f"https://{REDACTED}@data.example.com/corpus.jsonl", "seq_len": 256}
    assert clean["tokenizer"] == value["tokenizer"] and clean["sdg"]["api_key"] == REDACTED
    assert clean["sdg"]["endpoint"] == f"https://x.io/v1?api_key={REDACTED}&model=m"
    assert clean["presigned"].endswith("x-id=GetObject") and "X-Amz-Signature=***" in clean["presigned"]
    assert (clean["tokens_seen"], clean["max_new_tokens"], clean["hf_token"]) == (1234, 64, None)
    assert clean["digest"] == "ab" * 32 and clean["s3"] == "s3://bucket/prefix/model"
    assert [is_secret_key(k) for k in ("AWS_SECRET_ACCESS_KEY", "aws_access_key_id", "x-api-key", "HF_TOKEN",
                                       "tokenizer", "tokens_seen", "max_tokens_per_s", "author")] == \
        [True, True, True, True, False, False, False, False]


def test_no_secret_reaches_mlflow_or_the_logs(server_store, tokenizer_dir, tmp_path, monkeypatch, capfd, caplog,
                                              mlflow_server):
    store = server_store
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)  # the store really signs with it (moto accepts any)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    name = unique("secrets")
    recipe = {
        "name": "secrets", "data": {"source": f"https://alice:{URI_PASSWORD}@data.example.com/corpus.jsonl"},
        "sdg": {"api_key": API_KEY, "endpoint": "https://api.example.com/v1"}, "notes": f"hf token {HF_TOKEN}",
    }
    data = DataRef(uri=f"https://data.example.com/packed?X-Amz-Signature={SIGNATURE}", digest="e" * 64,
                   tokenizer_uri="/tmp/tok", tokenizer_digest="t" * 64, source=recipe["data"]["source"],
                   source_digest="s" * 64, seq_len=64, train_tokens=1000, validation_tokens=100,
                   lineage=Lineage(stage="data", spec_digest="x", code_digest="y"))
    ref = published_ref(store, tmp_path / "ckpt", "pretrain/s/model",
                        micro_checkpoint(tmp_path / "ckpt", tokenizer_dir, seed=3), "pretrain", [data.digest])
    with tracking.factory_run(recipe, experiment=name, tags={"launched_by": f"https://bob:{URI_PASSWORD}@ci"}) as run_id:
        with tracking.stage_run(run_id, "pretrain", params={"aws_secret_access_key": AWS_SECRET},
                                system_metrics=False) as stage:
            tracking.log_data_ref(stage, data)
            tracking.log_report(stage, {"score": 1.0, "password": REPORT_PASSWORD, "source": data.source})
            models.register_checkpoint(ref, store, name, run_id=stage, data_digest=data.digest)
        import logging

        logging.getLogger("registry").warning("connecting to %s", recipe["data"]["source"])

    # Everything MLflow now holds about these runs and this model, as one text.
    c = tracking.client()
    held = []
    for run in c.search_runs([c.get_experiment_by_name(name).experiment_id]):
        held += [json.dumps(run.data.params), json.dumps(run.data.tags)]
        for d in run.inputs.dataset_inputs:
            held += [d.dataset.name, d.dataset.source, d.dataset.profile or "", *(t.value for t in d.tags)]
        for artifact in ("recipe.json", "report.json"):
            if any(a.path == artifact for a in c.list_artifacts(run.info.run_id)):
                held.append(Path(c.download_artifacts(run.info.run_id, artifact, str(tmp_path))).read_text())
    mv = c.get_model_version(name, "1")
    held += [json.dumps(mv.tags), mv.description or "", json.dumps(c.get_registered_model(name).tags)]
    held = "\n".join(held)
    assert "data.example.com/corpus.jsonl" in held and '"score": 1.0' in held  # the non-secret parts are there
    output = capfd.readouterr()
    for secret in SECRETS:
        assert secret not in held, secret
        assert secret not in output.out + output.err + caplog.text, secret

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.replace("http://", f"http://bob:{URI_PASSWORD}@"))
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_USERNAME") as e:
        tracking.configure_tracking()
    assert URI_PASSWORD not in str(e.value)
    assert scrub_text(f"see https://u:{URI_PASSWORD}@h/x") == "see https://***@h/x"
