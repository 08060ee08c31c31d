"""The embedded default: no MLFLOW_TRACKING_URI, no server. MLflow on a SQLite file and
artifacts in a local folder, both under the artifact root."""

from __future__ import annotations

import time

import pytest
import torch

from flows.cli import main
from flows.recipe import parse_recipe
from model.architectures import build_model_config, get_family
from model.contract import ArchSummary, DataRef, Lineage, ModelRef
from model.spec import ModelSpec
from model.tokenizer import load_tokenizer, train_bpe
from registry import models, tracking
from store import open_store

from .conftest import REPO, recipe_dict, run_factory


@pytest.fixture
def embedded(tmp_path, monkeypatch):
    """A laptop: FACTORY_ARTIFACT_ROOT a local folder, no tracking server, run from another folder."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "artifacts"
    monkeypatch.setenv("FACTORY_ARTIFACT_ROOT", str(root))
    monkeypatch.setenv("FACTORY_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.chdir(tmp_path)
    return root


def test_tracking_uri_defaults_to_sqlite_under_the_artifact_root(embedded, monkeypatch):
    assert tracking.configure_tracking() == f"sqlite:///{embedded / 'mlflow.db'}"
    monkeypatch.setenv("FACTORY_ARTIFACT_ROOT", "s3://bucket/prefix")  # remote root: local database, in the work dir
    assert tracking.default_tracking_uri() == f"sqlite:///{embedded.parent / 'work' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking.tracking_uri() == "http://mlflow.internal:5000"


def test_a_flow_run_from_a_deployment_refuses_the_embedded_default_before_any_stage(embedded, monkeypatch):
    """On a worker (a deployment's flow run) the SQLite file would die with the pod: the flow stops
    first, naming MLFLOW_TRACKING_URI and how to keep a local file on purpose."""
    from flows.factory import factory

    monkeypatch.setattr("flows.factory.compose", lambda *a, **k: pytest.fail("a stage ran"))
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "0b6f6c7e-deployment")  # prefect.runtime's test hook
    with pytest.raises(RuntimeError, match="MLFLOW_TRACKING_URI is not set") as e:
        factory.fn(str(REPO / "recipes" / "tiny.yaml"))
    assert f"MLFLOW_TRACKING_URI=sqlite:///{embedded / 'mlflow.db'}" in str(e.value)
    assert "0b6f6c7e-deployment" in str(e.value) and not (embedded / "mlflow.db").exists()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # what an unresolved "{{ $MLFLOW_TRACKING_URI }}" becomes
    with pytest.raises(RuntimeError, match="MLFLOW_TRACKING_URI is not set"):
        tracking.require_shared_tracking("0b6f6c7e-deployment")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{embedded / 'chosen.db'}")  # a local file, on purpose
    tracking.require_shared_tracking("0b6f6c7e-deployment")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    tracking.require_shared_tracking(None)  # `factory run` on a laptop: the embedded default


def test_training_metrics_reach_mlflow_while_training_and_survive_an_unreachable_server(embedded, monkeypatch,
                                                                                        caplog):
    c = tracking.client()
    with tracking.factory_run({"name": "metrics"}) as run_id, \
            tracking.stage_run(run_id, "pretrain", system_metrics=False) as stage:
        log = tracking.MetricsBuffer(stage, every_seconds=0.0)  # a batch per record
        log({"step": 1, "loss": 3.0, "lr": 1e-3})
        assert [(m.step, m.value) for m in c.get_metric_history(stage, "loss")] == [(1, 3.0)]  # live, mid-run
        sqlite_uri = tracking.tracking_uri()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the server is gone for a while
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        log({"step": 2, "loss": 2.0, "lr": 1e-3})  # a warning, not a failed training stage
        assert "not sent yet" in caplog.text
        monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
        log({"step": 3, "loss": float("nan"), "lr": 1e-3})  # non-finite values are left out
    assert [(m.step, m.value) for m in c.get_metric_history(stage, "loss")] == [(1, 3.0), (2, 2.0)]
    assert [m.step for m in c.get_metric_history(stage, "lr")] == [1, 2, 3]


def test_parent_and_stage_runs_hold_recipe_metrics_data_and_system_metrics(embedded, corpus_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    recipe = parse_recipe(recipe_dict(corpus_dir, name="embedded"))
    data = DataRef(uri=str(embedded / "data/x"), digest="f" * 64, tokenizer_uri="/t", tokenizer_digest="t" * 64,
                   source=str(corpus_dir), source_digest="s" * 64, seq_len=64, train_tokens=5000,
                   validation_tokens=500, lineage=Lineage(stage="data", spec_digest="a", code_digest="b"))
    with tracking.factory_run(recipe) as run_id:
        with tracking.stage_run(run_id, "pretrain") as stage:
            tracking.log_data_ref(stage, data)
            log = tracking.metrics_callback(stage)
            for step in range(1, 5):  # what model.train.train hands its callbacks
                record = {"step": step, "loss": 6.0 - step / 2, "lr": 1e-3 * step, "grad_norm": 1.0,
                          "tokens_per_s": 1000.0 + step, "tokens_seen": 512 * step}
                if step % 2 == 0:
                    record["val_loss"] = 6.5 - step / 2
                log(record)
            time.sleep(2)  # a few system-metric samples
            tracking.log_report(stage, {"loss": 4.0, "tasks": {"hellaswag": 0.3}})
        with pytest.raises(RuntimeError, match="stage broke"):
            with tracking.stage_run(run_id, "evaluate", system_metrics=False):
                raise RuntimeError("stage broke")

    c = tracking.client()
    parent = c.get_run(run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "embedded"
    assert parent.data.params["train.lr"] == "0.01" and parent.data.params["data.seq_len"] == "64"
    assert parent.data.params["registry.key_metrics"] == '["val_loss", "final_loss", "tokens_seen"]'
    assert parent.data.tags["factory.recipe_digest"] and parent.data.tags["factory.git_commit"]
    stages = {r.info.run_name: r for r in c.search_runs([parent.info.experiment_id],
                                                        f"tags.mlflow.parentRunId = '{run_id}'")}
    assert set(stages) == {"pretrain", "evaluate"} and stages["evaluate"].info.status == "FAILED"
    pretrain = stages["pretrain"]
    assert [(m.step, m.value) for m in c.get_metric_history(pretrain.info.run_id, "loss")] == \
        [(1, 5.5), (2, 5.0), (3, 4.5), (4, 4.0)]
    assert [m.step for m in c.get_metric_history(pretrain.info.run_id, "val_loss")] == [2, 4]
    assert {"tokens_per_s", "lr", "grad_norm", "tokens_seen"} <= set(pretrain.data.metrics)
    assert "system/cpu_utilization_percentage" in pretrain.data.metrics
    (data_input,) = pretrain.inputs.dataset_inputs
    assert data_input.dataset.source_type == "local" and data_input.dataset.digest == "f" * 32
    assert {t.key: t.value for t in data_input.tags} == {"mlflow.data.context": "training", "factory.digest": "f" * 64}
    assert [a.path for a in c.list_artifacts(pretrain.info.run_id)] == ["report.json"]

    assert (embedded / "mlflow.db").is_file() and (embedded / "mlartifacts" / "embedded").is_dir()
    assert not (embedded.parent / "mlruns").exists()


@pytest.mark.slow  # a `factory` subprocess
def test_register_and_resolve_without_a_server(embedded, corpus_dir, tmp_path, capsys):
    tokenizer_dir = tmp_path / "tok"
    train_bpe([p.read_text() for p in sorted(corpus_dir.glob("*.txt"))[:8]], 512).save_pretrained(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    config = build_model_config(ModelSpec(preset="micro"), tokenizer)
    torch.manual_seed(0)
    folder = tmp_path / "ckpt"
    get_family("nemotron_h").model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    store = open_store()
    uri = store.publish(folder, "pretrain/micro/model")
    ref = ModelRef(uri=uri, digest=store.published_digest(uri),
                   architecture=ArchSummary(**get_family("nemotron_h").summarize(config)),
                   lineage=Lineage(stage="pretrain", spec_digest="s", code_digest="c", recipe_name="micro"),
                   metrics={"val_loss": 5.9})
    version = models.register_checkpoint(ref, store, "micro-local", gate_passed=True)
    assert (version.version, version.aliases) == ("1", ["candidate", "champion"])

    local = models.resolve_checkpoint("models:/micro-local@champion")
    assert local.name == ref.digest and (local / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert models.resolve_checkpoint(uri) == embedded / "pretrain/micro/model"
    assert not (embedded.parent / "mlruns").exists()

    # A fresh `factory` process finds the same registry from FACTORY_ARTIFACT_ROOT alone.
    listed = run_factory("models", "list", root=embedded).stdout.splitlines()
    assert listed[1].split()[:4] == ["micro-local", "1", "candidate,champion", "pretrain"]
    assert main(["models", "get", "micro-local@nope", str(tmp_path / "out")]) == 1
    assert "no model version 'models:/micro-local@nope'" in capsys.readouterr().err
