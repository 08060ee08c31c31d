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
