"""The stages in order through the command line: compress and distill, cached and resumable."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from model.checkpoint import MARKER_FILE

from .conftest import REPO, recipe_dict, run_factory, write_recipe

COMPRESS = {"importance": {"samples": 8, "batch_size": 4, "layer_samples": 4},
            "target": {"hidden_size": 48, "intermediate_size": 64, "mamba_num_heads": 4}}
DISTILL = {"train": {"steps": 30, "batch_size": 8, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 2,
                     "checkpoint_every": 10, "keep_checkpoints": 5, "eval_every": 30, "eval_batches": 2}}


@pytest.mark.slow  # `factory` subprocesses, one killed
def test_distill_resumes_after_sigkill_to_the_same_weights(corpus_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(corpus_dir, compress=COMPRESS, distill=DISTILL))
    root = tmp_path / "artifacts"
    first = run_factory("distill", str(recipe), root=root)
    assert "distilled" in first.stdout and "student" in first.stdout
    distilled = next(root.glob("distill/*/model"))
    straight = {k: v.clone() for k, v in load_file(str(distilled / "model.safetensors")).items()}
    student = AutoModelForCausalLM.from_pretrained(distilled)
    assert student.config.hidden_size == 48 and student.config.mamba_num_heads == 4

    # Forget the distillation (not the stages before it), then kill a re-run mid-way.
    shutil.rmtree(root / "distill")
    shutil.rmtree(root / "refs" / "distill")
    env = dict(os.environ, FACTORY_ARTIFACT_ROOT=str(root))
    child = subprocess.Popen([sys.executable, "-m", "flows.cli", "distill", str(recipe)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(root.glob(f"distill/*/checkpoints/step_00000010/{MARKER_FILE}")):
        assert child.poll() is None and time.monotonic() < deadline, "child ended before its first checkpoint"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    assert not list(root.glob("distill/*/model/model.safetensors")), "finished before the kill"

    resumed = run_factory("distill", str(recipe), root=root)
    assert "resuming distill micro from" in resumed.stderr
    assert "pretrain micro" not in resumed.stderr and "importance" not in resumed.stderr  # earlier stages cached
    again = load_file(str(next(root.glob("distill/*/model")) / "model.safetensors"))
    for name, tensor in straight.items():
        assert torch.equal(tensor, again[name]), name


@pytest.mark.slow  # `factory` subprocesses
def test_a_second_run_computes_nothing(corpus_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(corpus_dir, compress=COMPRESS))
    root = tmp_path / "artifacts"
    first = run_factory("compress", str(recipe), root=root)
    started = time.monotonic()
    second = run_factory("compress", str(recipe), root=root)
    assert second.stdout.splitlines()[-6:] == first.stdout.splitlines()[-6:]
    assert "pretrain micro" not in second.stderr and "training a" not in second.stderr
    assert time.monotonic() - started < 60
