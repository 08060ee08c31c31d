"""The align stages: SFT and DPO through TRL on a micro model, under the factory's checkpoints.

The data are arithmetic conversations built here ("What is 3 plus 4?" -> "The answer is 7.")
and pairs whose rejected reply is an evasion, so a model that learns anything learns to prefer
the chosen reply; the untrained micro model prefers neither.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from random import Random

import pytest

from alignment import preference_stage, sft_stage
from alignment.align_stage import dataset_ref
from alignment.spec import PreferenceSpec, SFTSpec
from model.contract import StageContext
from model.spec import TrainSpec
from store.local import LocalStore

from .conftest import REPO, free_port, recipe_dict, wait_for_http, write_recipe
from .test_sdg_generation import tiny_checkpoint


def _question(rng: Random) -> tuple[list[dict], int]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return [{"role": "user", "content": f"What is {a} plus {b}?"}], a + b


def write_alignment_data(folder: Path, rows: int = 48, seed: int = 0) -> tuple[Path, Path]:
    """``sft.jsonl`` and ``preference.jsonl`` in the SDG stage's columns."""
    rng = Random(seed)
    sft, preference = [], []
    for i in range(rows):
        prompt, total = _question(rng)
        answer = f"The answer is {total}."
        sft.append({"id": f"sft-{i}", "messages": prompt + [{"role": "assistant", "content": answer}]})
        preference.append({"id": f"pair-{i}", "prompt_messages": prompt, "chosen_response": answer,
                           "rejected_response": "I would rather not say, sorry about that."})
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (("sft", sft), ("preference", preference)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    return folder / "sft.jsonl", folder / "preference.jsonl"


def sft_spec(data: Path, **train) -> SFTSpec:
    return SFTSpec(data=str(data), max_length=64, held_out_fraction=0.2,
                   train=TrainSpec(**{"steps": 30, "batch_size": 8, "micro_batch_size": 4, "lr": 3e-3,
                                      "warmup_steps": 3, "checkpoint_every": 10, "eval_every": 30} | train))


def preference_spec(data: Path, **train) -> PreferenceSpec:
    return PreferenceSpec(data=str(data), max_length=64, held_out_fraction=0.2, beta=0.1,
                          train=TrainSpec(**{"steps": 16, "batch_size": 8, "micro_batch_size": 4, "lr": 1e-3,
                                             "warmup_steps": 2, "checkpoint_every": 8, "eval_every": 16} | train))


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """The micro model fine-tuned, then DPO-trained, through the two stages: (store, sft ref, preference ref, data)."""
    folder = tmp_path_factory.mktemp("align")
    sft_data, preference_data = write_alignment_data(folder / "data")
    store = LocalStore(folder / "artifacts")
    context = StageContext("align-micro")
    from model.architectures import external_model_ref

    base = external_model_ref(tiny_checkpoint(tmp_path_factory))
    sft = sft_stage.run(sft_spec(sft_data), {"model": base, "data": dataset_ref(str(sft_data), store)}, store, context)
    preference = preference_stage.run(preference_spec(preference_data),
                                      {"model": sft, "data": dataset_ref(str(preference_data), store)}, store, context)
    return store, sft, preference, (sft_data, preference_data)


def test_sft_lowers_the_held_out_loss_and_dpo_raises_the_margin_and_accuracy(aligned):
    store, sft, preference, _ = aligned
    m = sft.metrics
    assert m["held_out_rows"] > 0 and m["train_rows"] > m["held_out_rows"]
    assert m["after_loss"] < 0.6 * m["before_loss"], m  # the replies' loss on rows it never trained on

    m = preference.metrics
    # Before training the policy is its reference: every implicit reward, and so every margin, is 0.
    assert m["before_rewards/margins"] == pytest.approx(0, abs=1e-6) and m["before_rewards/accuracies"] == 0
    assert m["after_rewards/margins"] > 0.5 and m["after_rewards/accuracies"] >= 0.9, m
    # The model's own preference (log-probabilities of the replies) moved towards the chosen ones.
    assert m["after_logps_margin"] > m["before_logps_margin"]

    # What any consumer loads: weights, a tokenizer with the chat template, the training history.
    from transformers import AutoTokenizer

    folder = Path(preference.uri)
    assert AutoTokenizer.from_pretrained(folder).chat_template
    history = json.loads((folder / "measurements" / "training_history.json").read_text())
    assert [r["step"] for r in history["history"]] == list(range(1, 17))
    assert set(preference.lineage.parents) == {sft.digest, dataset_ref(str(aligned[3][1]), store).digest}


def test_each_step_is_cached_on_its_own_spec_and_inputs(aligned, tmp_path):
    store, sft, preference, (sft_data, preference_data) = aligned
    preference_inputs = {"model": sft, "data": dataset_ref(str(preference_data), store)}
    key = preference_stage.key(preference_spec(preference_data), preference_inputs)
    # A new beta is a new preference result (the SFT before it is reused: its key has no beta).
    assert preference_stage.key(preference_spec(preference_data).model_copy(update={"beta": 0.2}),
                                preference_inputs) != key
    # Placement (checkpoint cadence, processes) is not identity.
    assert preference_stage.key(preference_spec(preference_data, checkpoint_every=4), preference_inputs) == key
    # New data: a new key.
    other = tmp_path / "preference.jsonl"
    other.write_text(Path(preference_data).read_text().replace("sorry", "so sorry"))
    assert preference_stage.key(preference_spec(other), {"model": sft, "data": dataset_ref(str(other), store)}) != key
    # Run again: the stored result, nothing trains.
    again = preference_stage.run(preference_spec(preference_data), preference_inputs, store, StageContext("align-micro"))
    assert again == preference


def test_a_recipe_whose_alignment_lacks_its_inputs_is_refused_naming_the_fields(corpus_dir):
    from flows.recipe import RecipeError, parse_recipe

    with pytest.raises(RecipeError) as e:
        parse_recipe(recipe_dict(corpus_dir, align={"model": "student"}, reward_model={"base": "student"}))
    problems = dict(e.value.problems)
    assert "no distill section" in problems["align.model"] and "no distill section" in problems["reward_model.base"]
    assert "no sdg section" in problems["align.sft.data"] and "no sdg section" in problems["align.preference.data"]
    assert "no sdg section" in problems["reward_model.data"]
    with pytest.raises(RecipeError, match="align.model: TRL's trainers pad batches"):
        parse_recipe(recipe_dict(corpus_dir, model={"family": "hymba", "preset": "micro"},
                                 align={"model": "teacher", "sft": {"data": str(corpus_dir)}, "preference": None}))


def test_bad_alignment_data_is_refused_before_training(tmp_path, tmp_path_factory):
    from alignment.align import preference_examples, sft_examples

    with pytest.raises(ValueError, match="row 0's last message is 'user'"):
        sft_examples([{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "?"}]}])
    with pytest.raises(ValueError, match="row 0 lacks rejected_response"):
        preference_examples([{"prompt_messages": [], "chosen_response": "a"}])
    with pytest.raises(ValueError, match="neither 'sdg'"):
        SFTSpec(data=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="2 weights for 1 loss types"):
        PreferenceSpec(loss_weights=[1.0, 0.5])


@pytest.mark.slow
def test_the_aligned_model_answers_through_transformers_serves_chat_endpoint(aligned, tmp_path):
    """A real ``transformers serve`` on 127.0.0.1: its chat endpoint formats the conversation with
    the checkpoint's own template, and the model answers as it was fine-tuned to, then stops."""
    pytest.importorskip("openai", reason="transformers serve needs the `serving` extra")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(aligned[2].uri)
    question = [{"role": "user", "content": "What is 2 plus 5?"}]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    local = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert local.startswith("The answer is"), local

    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder),
                                   "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/health", timeout=120, process=server)
            body = json.dumps({"model": str(folder), "messages": question, "max_tokens": 24, "temperature": 0,
                               "stream": False}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                reply = json.loads(response.read())
        finally:
            server.terminate()
            server.wait(timeout=30)
    choice = reply["choices"][0]
    assert choice["message"]["content"].strip() == local.strip()
    assert choice["finish_reason"] == "stop"  # it ended its reply with eos, as the template trains it to


@pytest.mark.slow
def test_a_run_killed_during_dpo_resumes_and_registers_one_aligned_version(tmp_path, tmp_path_factory, corpus_dir):
    """``factory align`` SIGKILLed once the preference stage sealed a checkpoint; ``factory run``
    then resumes it from that checkpoint, evaluates and registers the aligned model once; a third
    run registers nothing new."""
    sft_data, preference_data = write_alignment_data(tmp_path / "data")
    teacher = tiny_checkpoint(tmp_path_factory)
    recipe = recipe_dict(
        corpus_dir, name="align-micro", start_from=str(teacher),
        align={"model": "teacher",
               "sft": sft_spec(sft_data, steps=8, checkpoint_every=8, eval_every=8).model_dump(mode="json"),
               "preference": preference_spec(preference_data, steps=16, checkpoint_every=4,
                                             eval_every=16).model_dump(mode="json")},
        evaluate={"sections": ["quality"], "quality": {"validation_rows": 8, "generation_prompts": 2,
                                                       "prompt_tokens": 8, "generation_tokens": 8},
                  "gate": {"max_val_loss_ratio": 10.0}})
    path = write_recipe(tmp_path / "align.yaml", recipe)
    root = tmp_path / "artifacts"
    env = dict(os.environ, FACTORY_ARTIFACT_ROOT=str(root), PREFECT_HOME=str(tmp_path / "prefect"),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("PREFECT_API_URL", "PREFECT_RESULTS_LOCAL_STORAGE_PATH"):
        env.pop(name, None)

    started = time.monotonic()
    first = subprocess.Popen([sys.executable, "-m", "flows.cli", "align", str(path)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(root.glob("preference/*/checkpoints/step_*/COMPLETE")):
        assert first.poll() is None, first.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no preference checkpoint within 300 s"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    print(f"killed after {time.monotonic() - started:.0f} s")
    assert not list(root.glob("preference/*/model/manifest.json"))  # it died mid-training

    run = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    print(f"resumed and registered after {time.monotonic() - started:.0f} s")
    assert "align: resuming from" in run.stdout + run.stderr
    assert run.stdout.strip().splitlines()[-1] == "models:/align-micro-teacher/2"  # v1: the teacher itself

    again = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(path)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == "models:/align-micro-teacher/2"
    listed = subprocess.run([sys.executable, "-m", "flows.cli", "models", "list", "--json"], cwd=REPO, env=env,
                            capture_output=True, text=True)
    versions = {r["version"]: r for r in json.loads(listed.stdout) if r["name"] == "align-micro-teacher"}
    assert sorted(versions) == ["1", "2"]
    aligned = versions["2"]
    assert aligned["stage"] == "preference" and aligned["parent"] == "align-micro-teacher/1"
    from model.digests import file_digest

    assert aligned["data_digest"] == file_digest(preference_data)


def test_factory_reward_trains_a_reward_model_the_sdg_scorer_loads(tmp_path, tmp_path_factory, corpus_dir, capsys,
                                                                   monkeypatch):
    from sdg.scorers import RewardModel

    from .conftest import run_cli

    monkeypatch.setenv("FACTORY_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    _, preference_data = write_alignment_data(tmp_path / "data", rows=64)
    recipe = recipe_dict(corpus_dir, name="reward-micro", start_from=str(tiny_checkpoint(tmp_path_factory)),
                         # a folder: the stage reads its preference.jsonl (beside sft.jsonl)
                         reward_model={"base": "teacher", "data": str(preference_data.parent), "steps": 150,
                                       "held_out_fraction": 0.25})
    code, out, err = run_cli("reward", str(write_recipe(tmp_path / "reward.yaml", recipe)), capsys=capsys)
    assert code == 0, err
    uri = out.strip().splitlines()[-1]
    line = next(x for x in out.splitlines() if x.startswith("reward"))
    metrics = dict(part.strip().rsplit(" ", 1) for part in line.split(";", 1)[1].split("  ")[0].split(","))
    # (an evasion is easy to tell apart: tests/test_reward_model.py compares against an untrained head)
    assert float(metrics["held_out_accuracy"]) >= 0.9 and float(metrics["pairs_held_out"]) > 0
    scorer = RewardModel(uri)
    chosen = [{"role": "user", "content": "What is 4 plus 4?"}, {"role": "assistant", "content": "The answer is 8."}]
    rejected = chosen[:1] + [{"role": "assistant", "content": "I would rather not say, sorry about that."}]
    assert scorer.score([chosen])[0]["reward"] > scorer.score([rejected])[0]["reward"]


@pytest.mark.slow
def test_two_processes_follow_the_one_process_curve(tmp_path, tmp_path_factory):
    """``num_processes: 2``: the stage launches torchrun and TRL's Trainer runs DDP (gloo on the
    CPU) over the same global batch, so the held-out result matches one process's."""
    from model.architectures import external_model_ref

    _, preference_data = write_alignment_data(tmp_path / "data")
    base = external_model_ref(tiny_checkpoint(tmp_path_factory))
    results = {}
    for processes in (1, 2):
        store = LocalStore(tmp_path / f"artifacts-{processes}")
        spec = preference_spec(preference_data, steps=6, checkpoint_every=3, eval_every=6, num_processes=processes)
        results[processes] = preference_stage.run(spec, {"model": base, "data": dataset_ref(str(preference_data), store)},
                                                  store, StageContext("align-ddp")).metrics
    for name in ("after_loss", "after_rewards/margins", "after_logps_margin"):
        assert results[2][name] == pytest.approx(results[1][name], rel=0.05, abs=0.02), name
    assert results[2]["after_rewards/margins"] > 0.1


def test_the_plan_of_a_recipe_that_aligns_lists_its_stages_in_order(tmp_path, tmp_path_factory, corpus_dir, capsys,
                                                                    monkeypatch):
    """``factory run --plan`` runs nothing: every alignment step (and the registration of the
    aligned version, whose parent does not exist yet) is planned."""
    from .conftest import run_cli

    monkeypatch.setenv("FACTORY_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    sft_data, preference_data = write_alignment_data(tmp_path / "data")
    recipe = recipe_dict(corpus_dir, name="align-plan", start_from=str(tiny_checkpoint(tmp_path_factory)),
                         align={"model": "teacher", "sft": {"data": str(sft_data)},
                                "preference": {"data": str(preference_data)}})
    code, out, err = run_cli("run", "--plan", str(write_recipe(tmp_path / "plan.yaml", recipe)), capsys=capsys)
    assert code == 0, err
    stages = [line.split()[1] for line in out.split("\n\n", 1)[1].splitlines() if line.strip()]
    assert stages == ["data", "sft", "preference", "evaluate", "register", "register"]
    assert not (tmp_path / "artifacts" / "sft").exists()
