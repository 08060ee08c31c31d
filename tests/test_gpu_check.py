"""``make gpu-check``'s script rehearsed on the CPU (``--dry-run``): every check runs the code the GPU
run will run, with tiny shapes, so the scarce GPU time is not spent finding a typo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from .conftest import REPO


@pytest.mark.slow
def test_the_gpu_check_dry_run_passes_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checks = json.loads(out.read_text())["checks"]
    assert {name: c["status"] for name, c in checks.items()} == {
        "environment": "passed", "fused_path": "passed", "stage_tests": "passed", "scale": "passed"}
    assert checks["fused_path"]["kl_nats_per_token"] < 1e-3
    assert "2 passed" in checks["stage_tests"]["summary"]  # tests/test_gpu.py ran, on the CPU
    scale = checks["scale"]
    assert scale["student"]["parameters"] < scale["teacher"]["parameters"]
    assert {(p["model"], p["batch"]) for p in scale["decode"]} >= {("teacher", 1), ("student", 1),
                                                                   ("attention_only", 1)}
    assert scale["kd_steps"]["losses"][-1] < scale["kd_steps"]["losses"][0]
    assert [t["precision"] for t in scale["training"]] == ["bf16", "fp8"]
    assert "skipped" in scale["training"][1]  # fp8 is refused on the CPU, with the reason recorded


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_make_gpu_check_without_cuda_says_so_and_stops(tmp_path):
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(tmp_path / "x.json")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "torch sees no CUDA device" in done.stderr
    assert not (tmp_path / "x.json").exists()
