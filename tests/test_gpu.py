"""The GPU tier (``pytest -m gpu``, run by ``make gpu-check``): every stage on CUDA in bfloat16 on a
micro model, called through the stage contract directly (no Prefect, no MLflow: the GPU machine
need not have them), and a resume after a kill.

Skipped without CUDA. ``bench/gpu_check.py --dry-run`` sets ``FACTORY_GPU_TESTS_ON_CPU=1`` to run
the same tests on the CPU (bf16 autocast there too), so the GPU run works on its first try.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compression import distill_stage, importance_stage, prune_stage, search_stage
from compression.prune_stage import PruneSpec
from compression.spec import Budget, DistillSpec, ImportanceSpec, SearchSpace, SearchSpec
from evaluation import evaluate_stage
from evaluation.spec import EvaluateSpec, QualitySpec
from model import data_stage, pretrain_stage
from model.checkpoint import MARKER_FILE
from model.contract import StageContext
from model.data_stage import DataStageSpec
from model.device import DevicePolicy
from model.pretrain_stage import PretrainSpec
from model.spec import DataSpec, ModelSpec, TokenizerSpec, TrainSpec
from store.local import LocalStore

REPO = Path(__file__).resolve().parents[1]
ON_CPU = os.environ.get("FACTORY_GPU_TESTS_ON_CPU") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(DEVICE != "cuda" and not ON_CPU, reason="needs a CUDA device (or FACTORY_GPU_TESTS_ON_CPU=1)"),
]

TRAIN = dict(batch_size=4, micro_batch_size=2, lr=1e-2, warmup_steps=1, checkpoint_every=2, eval_every=2,
             eval_batches=1, device=DEVICE, precision="bf16")


@pytest.fixture(scope="module")
def stages(corpus_dir, tmp_path_factory):
    """Data, pretrain, importance, search with short KD, prune, distill and evaluate, in order, on DEVICE."""
    store, context = LocalStore(tmp_path_factory.mktemp("gpu")), StageContext("gpu", device=DevicePolicy(DEVICE))
    data = data_stage.run(DataStageSpec(data=DataSpec(source=str(corpus_dir), seq_len=64, validation_fraction=0.1),
                                        tokenizer=TokenizerSpec(vocab_size=512)), {}, store, context)
    teacher = pretrain_stage.run(PretrainSpec(model=ModelSpec(preset="micro"), train=TrainSpec(steps=4, **TRAIN)),
                                 {"data": data}, store, context)
    scores = importance_stage.run(ImportanceSpec(samples=4, batch_size=2, layer_samples=2),
                                  {"teacher": teacher, "data": data}, store, context)
    search = search_stage.run(SearchSpec(space=SearchSpace(hidden_size=[48, 64]), budget=Budget(memory_gib=64),
                                         top_k=2, zero_shot_sequences=4, throughput_context=32,
                                         short_kd=DistillSpec(train=TrainSpec(steps=2, **TRAIN))),
                              {"teacher": teacher, "data": data, "scores": scores}, store, context)
    student = prune_stage.run(PruneSpec(), {"teacher": teacher, "scores": scores, "search": search}, store, context)
    distilled = distill_stage.run(DistillSpec(train=TrainSpec(steps=4, **TRAIN)),
                                  {"student": student, "teacher": teacher, "data": data}, store, context)
    evaluation = evaluate_stage.run(EvaluateSpec(sections=["quality"], quality=QualitySpec(
        validation_rows=4, generation_prompts=1, prompt_tokens=4, generation_tokens=4)),
        {"teacher": teacher, "models": [distilled], "data": data}, store, context)
    return store, {"teacher": teacher, "search": search, "student": student, "distilled": distilled,
                   "evaluation": evaluation}


def test_every_stage_runs_in_bf16_and_writes_bf16_checkpoints(stages):
    store, refs = stages
    for name in ("teacher", "distilled"):
        config = json.loads((store.fetch(refs[name].uri) / "config.json").read_text())
        assert config["dtype"] == "bfloat16", name
        assert refs[name].metrics["val_loss"] == refs[name].metrics["val_loss"], name  # finite, not NaN
    report = json.loads((store.fetch(refs["search"].uri) / "measurements" / "search.json").read_text())
    finalists = [c for c in report["candidates"] if c["kd_loss"] is not None]
    assert len(finalists) == 2 and all(c["notes"][-1].startswith("short KD: 2 steps") for c in finalists)
    assert refs["student"].architecture.config["hidden_size"] == report["chosen"]["architecture"]["hidden_size"]
    evaluation = refs["evaluation"]
    label = evaluation.label_of(refs["distilled"].digest)
    assert label is not None and evaluation.metrics[label]["val_loss"] < 10


def _pretrain_launch(work: Path, data_dir: Path, tokenizer_dir: Path) -> Path:
    spec = PretrainSpec(model=ModelSpec(preset="micro"),
                        train=TrainSpec(steps=12, **(TRAIN | {"checkpoint_every": 4, "eval_every": 12})))
    launch = work / "launch.json"
    work.mkdir(parents=True)
    launch.write_text(json.dumps({"spec": spec.model_dump(mode="json"), "data_dir": str(data_dir),
                                  "tokenizer_dir": str(tokenizer_dir), "work_dir": str(work),
                                  "description": "gpu resume"}))
    return launch


def test_a_killed_training_process_resumes_to_the_same_weights(micro_data, tmp_path):
    """The torchrun worker entry point (``python -m model.pretrain_stage LAUNCH``), killed after its
    first checkpoint and started again, ends with the weights of an uninterrupted run."""
    data_dir, tokenizer_dir = Path(micro_data.uri), Path(micro_data.tokenizer_uri)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    straight = _pretrain_launch(tmp_path / "straight", data_dir, tokenizer_dir)
    killed = _pretrain_launch(tmp_path / "killed", data_dir, tokenizer_dir)
    worker = lambda launch: [sys.executable, "-m", "model.pretrain_stage", str(launch)]

    # On a CPU the uninterrupted run goes beside the one to kill (own folders, same seed, one thread each), as
    # most of a worker's time there is its start (~9 s of imports). On a GPU it runs first, alone: mamba-ssm's
    # Triton kernels autotune by timing, and a GPU shared with the other worker could tune (and so round) the
    # two runs differently.
    if DEVICE == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # or two processes' OpenMP threads wait on each other's cores
    uninterrupted = subprocess.Popen(worker(straight), cwd=REPO, env=env)
    child = None
    try:
        if DEVICE != "cpu":
            assert uninterrupted.wait() == 0, "the uninterrupted run failed"
        child = subprocess.Popen(worker(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while not (killed.parent / "checkpoints" / "step_00000004" / MARKER_FILE).exists():
            assert child.poll() is None and time.monotonic() < deadline, "the worker ended before its first checkpoint"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert not (killed.parent / "model").exists(), "the run finished before the kill; the test proves nothing"
        subprocess.run(worker(killed), cwd=REPO, env=env, check=True)
        assert uninterrupted.wait(timeout=300) == 0, "the uninterrupted run failed"
    finally:
        for process in (child, uninterrupted):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()

    a = load_file(str(straight.parent / "model" / "model.safetensors"))
    b = load_file(str(killed.parent / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
