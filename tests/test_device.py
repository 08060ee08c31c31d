"""The device policy (model/device.py): one place decides where every stage's tensors live."""

from __future__ import annotations

import pytest
import torch

from model.device import DevicePolicy

from .conftest import recipe_dict, run_cli, write_recipe

NO_CUDA = not torch.cuda.is_available()


def test_auto_takes_what_torch_sees_and_a_spec_naming_a_device_wins():
    assert DevicePolicy().choose() == ("cuda" if torch.cuda.is_available() else "cpu")
    assert DevicePolicy("cpu").choose("auto") == "cpu"
    assert DevicePolicy("cuda").choose("cpu") == "cpu"
    assert DevicePolicy("cpu").resolve("auto") == torch.device("cpu")


def test_the_environment_sets_a_workers_policy_and_a_bad_value_is_named(monkeypatch):
    monkeypatch.setenv("FACTORY_DEVICE", "CPU")
    assert DevicePolicy.from_environment() == DevicePolicy("cpu")
    monkeypatch.setenv("FACTORY_DEVICE", "gpu")
    with pytest.raises(ValueError, match="FACTORY_DEVICE must be one of auto, cpu, cuda, got 'gpu'"):
        DevicePolicy.from_environment()


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
def test_cuda_where_there_is_none_fails_naming_who_asked_before_any_work(corpus_dir, tmp_path, monkeypatch, capsys):
    with pytest.raises(RuntimeError, match="train.device is 'cuda' but torch sees no CUDA device"):
        DevicePolicy().choose("cuda", "train.device")
    with pytest.raises(RuntimeError, match="FACTORY_DEVICE is 'cuda'"):
        DevicePolicy("cuda").choose()

    root = tmp_path / "artifacts"
    monkeypatch.setenv("FACTORY_ARTIFACT_ROOT", str(root))
    monkeypatch.setenv("FACTORY_DEVICE", "cuda")
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(corpus_dir))
    code, _, err = run_cli("pretrain", str(recipe), capsys=capsys)
    assert code == 1 and "FACTORY_DEVICE is 'cuda' but torch sees no CUDA device" in err
    assert not root.exists() or not any(root.iterdir())  # nothing was computed or written


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
def test_fp8_on_a_worker_that_cannot_run_it_fails_naming_the_loop_before_any_work(corpus_dir, tmp_path, monkeypatch,
                                                                                   capsys):
    root = tmp_path / "artifacts"
    monkeypatch.setenv("FACTORY_ARTIFACT_ROOT", str(root))
    recipe = recipe_dict(corpus_dir, compress={"target": {"hidden_size": 48}},
                         distill={"train": {"steps": 2, "batch_size": 4, "micro_batch_size": 4, "precision": "fp8"}})
    code, _, err = run_cli("run", str(write_recipe(tmp_path / "r.yaml", recipe)), capsys=capsys)
    assert code == 1 and "distill.train.precision is 'fp8' but this stage trains on the CPU" in err
    assert not root.exists() or not any(root.iterdir())
