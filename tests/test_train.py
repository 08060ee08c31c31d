"""The training loop: schedules, resume after a hard kill, broken checkpoints, NaN, DDP."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model import pretrain_stage
from model.architectures import build_model_config, get_family
from model.checkpoint import MARKER_FILE, SHARDED_DIR, checkpoint_problem, find_latest, list_checkpoints
from model.contract import StageContext
from model.data import PackedTokens
from model.pretrain_stage import PretrainSpec
from model.spec import ModelSpec, TrainSpec
from model.tokenizer import load_tokenizer
from model.train import HISTORY_FILE, TrainingDiverged, lm_loss, lr_factor, train
from store.local import LocalStore

from .conftest import REPO, recipe_dict, run_factory, write_recipe


def _micro_model(data_ref, seed=0):
    tokenizer = load_tokenizer(data_ref.tokenizer_uri)
    config = build_model_config(ModelSpec(preset="micro"), tokenizer)
    torch.manual_seed(seed)
    return get_family("nemotron_h").model_class(config)


def test_lr_schedules():
    cosine = TrainSpec(steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1, lr=1.0)
    assert lr_factor(0, cosine) == pytest.approx(0.1)
    assert lr_factor(9, cosine) == pytest.approx(1.0)
    assert lr_factor(55, cosine) == pytest.approx(0.55)  # half-way through the decay
    assert lr_factor(100, cosine) == pytest.approx(0.1)
    wsd = TrainSpec(steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_factor(50, wsd) == 1.0 and lr_factor(79, wsd) == 1.0
    assert lr_factor(90, wsd) == pytest.approx(0.5) and lr_factor(100, wsd) == pytest.approx(0.0)


@pytest.mark.slow  # a fresh loader process
def test_training_decreases_loss_and_output_loads_with_plain_transformers(micro_data, tmp_path):
    spec = PretrainSpec(model=ModelSpec(preset="micro"),
                        train=TrainSpec(steps=12, batch_size=8, micro_batch_size=4, lr=1e-2, warmup_steps=2,
                                        checkpoint_every=6, eval_every=6, eval_batches=2))
    store = LocalStore(tmp_path)
    ref = pretrain_stage.run(spec, {"data": micro_data}, store, StageContext("micro"))
    history = json.loads((Path(ref.uri) / HISTORY_FILE).read_text())["history"]
    assert history[-1]["loss"] < history[0]["loss"] - 0.5
    assert ref.metrics["val_loss"] < math.log(512)
    assert ref.architecture.layer_pattern == "M-*M-" and ref.lineage.parents == [micro_data.digest]
    assert store.verify(ref.uri, ref.digest, deep=True)

    # A fresh interpreter that imports only transformers loads it and generates.
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1]); m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "ids = tok('def main(', return_tensors='pt').input_ids\n"
        "out = m.generate(ids, max_new_tokens=8, do_sample=False)\n"
        "assert out.shape[1] > ids.shape[1]\n"
        "assert not any(name in sys.modules for name in ('model', 'flows', 'compression', 'registry'))\n"
        "print(type(m).__name__, repr(tok.decode(out[0])))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, ref.uri], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("NemotronHForCausalLM 'def main(")

    # A second run with the same spec and data returns the stored ref without training.
    assert pretrain_stage.run(spec, {"data": micro_data}, store, StageContext("micro")) == ref


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(Path(folder).rglob("model.safetensors"))))


@pytest.mark.slow  # a training subprocess, killed
def test_resume_after_sigkill_reaches_the_same_weights(corpus_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(
        corpus_dir, train={"steps": 40, "checkpoint_every": 10, "keep_checkpoints": 5, "eval_every": 20}))

    straight = tmp_path / "straight"
    run_factory("pretrain", str(recipe), root=straight)

    killed = tmp_path / "killed"
    env = dict(__import__("os").environ, FACTORY_ARTIFACT_ROOT=str(killed))
    child = subprocess.Popen([sys.executable, "-m", "flows.cli", "pretrain", str(recipe)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(killed.glob(f"pretrain/*/checkpoints/step_00000010/{MARKER_FILE}")):
        assert child.poll() is None and time.monotonic() < deadline, "child ended before its first checkpoint"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    work = next(killed.glob("pretrain/*"))
    assert not (work / "model").exists(), "the run finished before the kill; the test proves nothing"

    resumed = run_factory("pretrain", str(recipe), root=killed)
    assert "resuming pretrain micro from" in resumed.stderr
    a, b = _tensors(straight / "pretrain"), _tensors(work / "model")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow  # a training subprocess on an S3 root, killed, its machine's disk lost
def test_a_stage_evicted_with_its_disk_resumes_on_another_machine_from_the_store(corpus_dir, tmp_path, s3_env,
                                                                                 monkeypatch):
    import boto3

    from store.s3 import S3Store

    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(
        corpus_dir, train={"steps": 40, "checkpoint_every": 5, "keep_checkpoints": 2, "eval_every": 20}))
    straight = tmp_path / "straight"
    run_factory("pretrain", str(recipe), root=straight)

    bucket = "eviction"
    boto3.client("s3").create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/factory"
    first_machine, second_machine = tmp_path / "machine-1", tmp_path / "machine-2"
    env = dict(__import__("os").environ, FACTORY_ARTIFACT_ROOT=root, FACTORY_WORK_DIR=str(first_machine))
    child = subprocess.Popen([sys.executable, "-m", "flows.cli", "pretrain", str(recipe)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    listing = boto3.client("s3")
    published = re.compile(r"/checkpoints/step_(\d+)/manifest\.json$")
    deadline = time.monotonic() + 300
    # Any checkpoint will do: one sealed while another uploads may be skipped for the newer one,
    # and the store keeps only the newest keep_checkpoints.
    while not any(published.search(o["Key"]) and int(published.search(o["Key"]).group(1)) < 40
                  for o in listing.list_objects_v2(Bucket=bucket, Prefix="factory/pretrain/").get("Contents", [])):
        assert child.poll() is None and time.monotonic() < deadline, "child ended before a checkpoint reached the store"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, "the run finished before the kill; the test proves nothing"
    shutil.rmtree(first_machine)  # the pod is gone, and its disk with it

    monkeypatch.setenv("FACTORY_WORK_DIR", str(second_machine))
    resumed = run_factory("pretrain", str(recipe), root=root)
    assert "downloading it from s3://eviction/factory/pretrain/" in resumed.stderr
    step = int(re.search(r"resuming pretrain micro from .* \(step (\d+)\)", resumed.stderr).group(1))
    assert 5 <= step < 40, step
    model_uri = resumed.stdout.strip().splitlines()[-1]
    a, b = _tensors(straight / "pretrain"), _tensors(S3Store(root).fetch(model_uri))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The store keeps the newest keep_checkpoints it published (one sealed while another uploads may be
    # skipped for the newer one), the last step's among them.
    store = S3Store(root)
    key = store.key_of(next(second_machine.glob("stages/eviction/factory/pretrain/*/checkpoints")))
    published = store.published_under(key)
    assert len(published) == 2 and published[-1] == "step_00000040", published


def test_truncated_newest_checkpoint_is_skipped(micro_data, tmp_path):
    spec = TrainSpec(steps=9, batch_size=8, micro_batch_size=4, lr=1e-2, warmup_steps=2, checkpoint_every=3,
                     keep_checkpoints=5, eval_every=100)
    data = PackedTokens(micro_data.uri, "train")
    straight = _micro_model(micro_data)
    train(straight, data, spec, tmp_path / "straight")

    # Keep steps 3 and 6, truncate 6's weights: the resume must go back to step 3 and still
    # reach the uninterrupted weights.
    work = tmp_path / "damaged"
    shutil.copytree(tmp_path / "straight", work)
    shutil.rmtree(work / "checkpoints" / "step_00000009")
    weights = work / "checkpoints" / "step_00000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "truncated" in checkpoint_problem(weights.parent)

    resumed = _micro_model(micro_data, seed=123)  # different init: everything must come from step 3
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_00000006.*truncated"):
        result = train(resumed, data, spec, work)
    assert [r["step"] for r in result["history"]] == list(range(1, 10))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(micro_data, tmp_path):
    calls = {"n": 0}

    def poisoned_loss(net, input_ids, target_mask):
        calls["n"] += 1
        loss = lm_loss(net, input_ids, target_mask)
        return loss * float("nan") if calls["n"] > 8 else loss  # 2 micro-batches per step: NaN at step 5

    spec = TrainSpec(steps=10, batch_size=8, micro_batch_size=4, checkpoint_every=3, eval_every=100)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5.*step_00000003"):
        train(_micro_model(micro_data), PackedTokens(micro_data.uri, "train"), spec, tmp_path, loss_fn=poisoned_loss)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000003"]
    assert checkpoint_problem(tmp_path / "checkpoints" / "step_00000003") is None
    state = find_latest(tmp_path / "checkpoints")
    assert all(math.isfinite(t.float().sum()) for t in load_file(str(state.path / "model.safetensors")).values())


def _short_run(data_ref, root: Path, num_processes: int, parallelism: str = "ddp", on_step: tuple = ()):
    spec = PretrainSpec(model=ModelSpec(preset="micro"),
                        train=TrainSpec(steps=5, batch_size=8, micro_batch_size=4, lr=1e-2, warmup_steps=1,
                                        eval_every=5, checkpoint_every=2, keep_checkpoints=5,
                                        num_processes=num_processes, parallelism=parallelism))
    ref = pretrain_stage.run(spec, {"data": data_ref}, LocalStore(root), StageContext("dist", on_step=on_step))
    return Path(ref.uri), _losses(ref)


def _losses(ref) -> list[float]:
    return [r["loss"] for r in json.loads((Path(ref.uri) / HISTORY_FILE).read_text())["history"]]


@pytest.mark.slow  # torchrun with 2 processes
def test_two_gloo_processes_follow_the_single_process_curve_replicated_or_sharded(micro_data, tmp_path, capfd):
    _, one = _short_run(micro_data, tmp_path / "one", 1)  # one process, 2 micro-batches of 4
    records = []  # what the stage's context hears from rank 0 of the torchrun workers (MLflow's live curves)
    ddp_model, ddp = _short_run(micro_data, tmp_path / "ddp", 2, on_step=(records.append,))  # 2 processes, 1 micro-batch each
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and [r["loss"] for r in records] == ddp
    fsdp_model, fsdp = _short_run(micro_data, tmp_path / "fsdp", 2, "fsdp")
    assert len(one) == len(ddp) == len(fsdp) == 5
    assert one == pytest.approx(ddp, rel=1e-4)
    assert one == pytest.approx(fsdp, rel=1e-4)
    # FSDP saves whole weights that plain transformers loads, not one process's shard.
    config = json.loads((fsdp_model / "config.json").read_text())
    assert config["architectures"] == ["NemotronHForCausalLM"]
    replicated, sharded = _tensors(ddp_model), _tensors(fsdp_model)
    assert replicated.keys() == sharded.keys()
    for name in replicated:
        torch.testing.assert_close(sharded[name], replicated[name], rtol=1e-4, atol=1e-5, msg=name)

    # FSDP saved sharded: one safetensors file per process, no whole copy of the weights anywhere.
    checkpoints = next((tmp_path / "fsdp").glob("pretrain/*/checkpoints"))
    step4 = checkpoints / "step_00000004"
    assert len(list((step4 / SHARDED_DIR).glob("*.safetensors"))) == 2
    assert not (step4 / "model.safetensors").exists()
    # Resume from it with 2 processes and with 1 (resharded): lose the result and the last checkpoint,
    # run again. The number of processes is placement, so both find the same work folder.
    shutil.copytree(tmp_path / "fsdp", tmp_path / "fsdp-then-one")
    for root, num_processes in ((tmp_path / "fsdp", 2), (tmp_path / "fsdp-then-one", 1)):
        shutil.rmtree(root / "refs")
        shutil.rmtree(next(root.glob("pretrain/*/model")))
        shutil.rmtree(next(root.glob("pretrain/*/checkpoints/step_00000005")))
        capfd.readouterr()
        resumed_model, resumed = _short_run(micro_data, root, num_processes, "fsdp")
        assert "(step 4)" in capfd.readouterr().err, num_processes
        assert resumed == pytest.approx(fsdp, rel=1e-5), num_processes
        for name, tensor in _tensors(resumed_model).items():
            torch.testing.assert_close(tensor, sharded[name], rtol=1e-5, atol=1e-6, msg=f"{num_processes}: {name}")


@pytest.mark.slow  # torchrun with 2 processes
def test_fsdp_distillation_shards_student_and_teacher_and_follows_one_process(micro_data, tmp_path):
    from compression import distill_stage, importance_stage, prune_stage
    from compression.spec import DistillSpec, ImportanceSpec, PruneTarget

    store, context = LocalStore(tmp_path / "store"), StageContext("kd")
    teacher = pretrain_stage.run(PretrainSpec(model=ModelSpec(preset="micro"),
                                              train=TrainSpec(steps=3, batch_size=8, micro_batch_size=4, warmup_steps=1)),
                                 {"data": micro_data}, store, context)
    scores = importance_stage.run(ImportanceSpec(samples=8, method="random"), {"teacher": teacher, "data": micro_data},
                                  store, context)
    student = prune_stage.run(prune_stage.PruneSpec(target=PruneTarget(hidden_size=48)),
                              {"teacher": teacher, "scores": scores}, store, context)

    def distill(num_processes: int, parallelism: str = "ddp") -> list[float]:
        train = TrainSpec(steps=3, batch_size=8, micro_batch_size=4, lr=1e-2, warmup_steps=1,
                          num_processes=num_processes, parallelism=parallelism)
        ref = distill_stage.run(DistillSpec(train=train), {"student": student, "teacher": teacher, "data": micro_data},
                                store, context)
        return _losses(ref)

    assert distill(1) == pytest.approx(distill(2, "fsdp"), rel=1e-4)
