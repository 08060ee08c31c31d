"""Hymba checkpoints: save -> load in a fresh process, through the project's Auto classes and
through ``trust_remote_code`` from the folder alone; and `factory pretrain` on a Hymba recipe."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from model.hymba import HymbaForCausalLM, build_config
from model.train import HISTORY_FILE

from .conftest import recipe_dict, run_factory, write_recipe

PROMPT = [[5, 17, 42, 7, 99, 3]]

# Run in a fresh interpreter: load FOLDER, print the greedy continuation of PROMPT and its last logits as JSON.
LOADER = textwrap.dedent("""
    import json, sys
    import torch

    folder, mode, prompt = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    if mode == "remote":
        # Prove the folder is enough: refuse every import of the project's packages.
        class BlockProject:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"model", "flows", "registry", "compression", "sdg", "tasks"}:
                    raise ImportError(f"project package {name} must not be needed")
        sys.meta_path.insert(0, BlockProject())
    else:
        import model.architectures  # registers the Auto classes

    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=(mode == "remote")).eval()
    prompt = torch.tensor(prompt)
    with torch.no_grad():
        logits = net(input_ids=prompt, use_cache=False).logits[0, -1]
        generated = net.generate(prompt, max_new_tokens=8, do_sample=False)
    print(json.dumps({"class": type(net).__module__ + "." + type(net).__name__,
                      "logits": logits.tolist(), "generated": generated[0].tolist(),
                      "project_loaded": any(m == "model" or m.startswith("model.") for m in sys.modules)}))
""")


def load_in_fresh_process(folder, mode: str, cwd) -> dict:
    script = cwd / "load.py"
    script.write_text(LOADER)
    result = subprocess.run([sys.executable, str(script), str(folder), mode, json.dumps(PROMPT)], cwd=cwd,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a fresh loader process
def test_save_load_round_trip_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    net = HymbaForCausalLM(build_config("micro", {"initializer_range": 0.1})).eval()
    saved = tmp_path / "saved"
    net.save_pretrained(saved)
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "hymba"
    assert config["auto_map"] == {"AutoConfig": "configuration_hymba.HymbaConfig",
                                  "AutoModelForCausalLM": "modeling_hymba.HymbaForCausalLM"}
    prompt = torch.tensor(PROMPT)
    with torch.no_grad():
        expected_logits = net(input_ids=prompt, use_cache=False).logits[0, -1]
        expected_ids = net.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist()

    # 1. Inside the project: the registered Auto classes, no remote code.
    local = load_in_fresh_process(saved, "project", tmp_path)
    assert local["class"] == "model.hymba.modeling_hymba.HymbaForCausalLM"
    # 2. Elsewhere: a copy of the folder, trust_remote_code, and no project package importable.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(saved, elsewhere / "hymba-micro")
    remote = load_in_fresh_process(elsewhere / "hymba-micro", "remote", elsewhere)
    assert remote["class"].startswith("transformers_modules.") and not remote["project_loaded"]

    for loaded in (local, remote):
        torch.testing.assert_close(torch.tensor(loaded["logits"]), expected_logits, rtol=1e-5, atol=1e-5)
        assert loaded["generated"] == expected_ids


@pytest.mark.slow  # data preparation, 8 training steps, a `factory` subprocess, a fresh loader process
def test_factory_pretrains_a_hymba_recipe(corpus_dir, tmp_path):
    recipe = recipe_dict(corpus_dir, name="hymba-micro", model={"family": "hymba", "preset": "micro"},
                         train={"steps": 8, "lr": 1e-2, "checkpoint_every": 4, "eval_every": 4})
    path = write_recipe(tmp_path / "hymba-micro.yaml", recipe)
    root = tmp_path / "artifacts"

    validated = run_factory("validate", str(path), root=root)
    assert "hymba preset micro, 6 layers GWGWwG" in validated.stdout

    result = run_factory("pretrain", str(path), root=root)
    folder = Path(result.stdout.strip().splitlines()[-1])  # the published model folder
    history = json.loads((folder / HISTORY_FILE).read_text())
    losses = [r["loss"] for r in history["history"]]
    assert losses[-1] < losses[0], losses
    import model.architectures  # noqa: F401  registers the Auto classes in this process

    net = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(net) is HymbaForCausalLM and net.config.num_hidden_layers == 6
    with torch.no_grad():
        expected = net.generate(torch.tensor(PROMPT), max_new_tokens=8, do_sample=False)[0].tolist()
    # The factory's output folder is a checkpoint in its own right: it loads without the project.
    remote = load_in_fresh_process(folder, "remote", tmp_path)
    assert not remote["project_loaded"] and remote["generated"] == expected


@pytest.mark.slow  # `factory run` of a micro Hymba recipe: every stage, Prefect and MLflow included
def test_factory_run_compresses_distills_evaluates_and_registers_a_hymba_student(corpus_dir, tmp_path):
    import os

    recipe = recipe_dict(
        corpus_dir, name="hymba-micro", model={"family": "hymba", "preset": "micro"},
        train={"steps": 8, "lr": 1e-2, "checkpoint_every": 4, "eval_every": 4},
        compress={"importance": {"samples": 8, "batch_size": 4, "layer_samples": 4},
                  # every Hymba axis: hidden, FFN, hybrid heads and a window layer (globals are kept)
                  "target": {"hidden_size": 48, "intermediate_size": 64, "num_attention_heads": 2, "num_layers": 5}},
        distill={"train": {"steps": 6, "batch_size": 8, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 1,
                           "checkpoint_every": 3, "eval_every": 6, "eval_batches": 2}},
        evaluate={"sections": ["quality", "efficiency"],
                  "quality": {"validation_rows": 8, "generation_prompts": 2, "prompt_tokens": 8, "generation_tokens": 8},
                  "efficiency": {"batch_sizes": [1], "context_lengths": [32], "decode_tokens": 4, "repeats": 1},
                  "gate": {"max_val_loss_ratio": 2.0}})
    path = write_recipe(tmp_path / "hymba-micro.yaml", recipe)
    env = dict(os.environ, FACTORY_ARTIFACT_ROOT=str(tmp_path / "artifacts"), PREFECT_HOME=str(tmp_path / "prefect"),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    for key in ("PREFECT_API_URL", "PREFECT_RESULTS_LOCAL_STORAGE_PATH"):
        env.pop(key, None)
    run = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(path)], cwd=Path(__file__).parents[1], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "models:/hymba-micro/1"

    listed = subprocess.run([sys.executable, "-m", "flows.cli", "models", "list", "--json"], cwd=Path(__file__).parents[1],
                            env=env, capture_output=True, text=True)
    student = [r for r in json.loads(listed.stdout) if r["name"] == "hymba-micro"]
    assert len(student) == 1 and "champion" in student[0]["aliases"] and student[0]["stage"] == "distill"

    # The report measures the student's cache and decode speed beside the teacher's.
    metrics = json.loads(next((tmp_path / "artifacts").glob("evaluate/*/report/metrics.json")).read_text())
    teacher_label = metrics["teacher"]
    (student_label,) = set(metrics["models"]) - {teacher_label}
    points = {label: metrics["models"][label]["result"]["efficiency"]["points"][0] for label in metrics["models"]}
    for point in points.values():
        assert point["decode_tokens_per_s"] > 0 and point["cache_bytes_per_sequence"] > 0
    # 5 layers of 48 channels against 6 of 64: the student's cache is smaller.
    assert points[student_label]["cache_bytes_per_sequence"] < points[teacher_label]["cache_bytes_per_sequence"]
    assert metrics["models"][student_label]["result"]["model"]["family"] == "hymba"
