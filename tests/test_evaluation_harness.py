"""lm-evaluation-harness through its standard ``hf`` model type, on our generated local tasks."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from evaluation.harness import (
    LOCAL_TAG,
    LOCAL_TASKS,
    UnknownTaskError,
    check_task_names,
    read_local_task,
    run_lm_eval,
    score_local_task,
    task_manager,
    write_local_tasks,
)
from model.architectures import build_model_config
from model.nemotron_h import NemotronHForCausalLM
from model.spec import DataSpec, ModelSpec, TokenizerSpec
from model.tokenizer import load_tokenizer
from store.local import LocalStore

from .conftest import prepare_data

pytest.importorskip("lm_eval")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(corpus_dir, tmp_path_factory):
    store = LocalStore(tmp_path_factory.mktemp("harness-data"))
    data = prepare_data(DataSpec(source=str(corpus_dir), seq_len=64, validation_fraction=0.1),
                            TokenizerSpec(vocab_size=512), store)
    tokenizer = load_tokenizer(data.tokenizer_uri)
    folder = tmp_path_factory.mktemp("harness-model")
    torch.manual_seed(0)
    NemotronHForCausalLM(build_model_config(ModelSpec(preset="micro"), tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    write_local_tasks(folder, items=24, seed=0)
    return folder, task_manager(folder)  # lm-eval indexes its whole task tree: seconds, so once


def test_local_tasks_are_generated_deterministically(tmp_path):
    assert write_local_tasks(tmp_path / "a", items=10, seed=5) == list(LOCAL_TASKS)
    write_local_tasks(tmp_path / "b", items=10, seed=5)
    for name in LOCAL_TASKS:
        assert read_local_task(tmp_path / "a", name) == read_local_task(tmp_path / "b", name)
    docs = read_local_task(tmp_path / "a", "factory_arithmetic")
    for doc in docs:  # the labelled choice is the sum
        a, b = (int(x) for x in doc["context"].split(":")[1].split("=")[0].split("+"))
        assert int(doc["choices"][doc["label"]]) == a + b


def test_lm_eval_accuracy_equals_our_loglikelihood_scoring(checkpoint, tasks, tmp_path):
    folder, manager = tasks
    forks = []
    os.register_at_fork(before=lambda: forks.append(1))
    scores = run_lm_eval(checkpoint, [LOCAL_TAG], manager, batch_size=4, output_path=tmp_path / "lm_eval.json")
    # lm-eval bootstraps the perplexity stderr in a forked pool by default; forked from a Prefect
    # task it hung the demo, so the evaluation must stay in-process.
    assert forks == []
    assert set(scores) == set(LOCAL_TASKS)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    for name in LOCAL_TASKS:
        ours = score_local_task(model, tokenizer, folder, name)
        for metric, value in ours.items():
            assert scores[name][metric] == pytest.approx(value, abs=1e-9), (name, metric)
    assert "factory_copy" in (tmp_path / "lm_eval.json").read_text()


def test_unknown_task_names_list_close_matches(tasks):
    _, manager = tasks
    with pytest.raises(UnknownTaskError) as error:
        check_task_names(["factory_kv_recal", "hellaswag", "zzzz_no_such_task"], manager)
    message = str(error.value)
    assert "unknown lm-eval task 'factory_kv_recal'; did you mean factory_kv_recall" in message
    assert "'zzzz_no_such_task'" in message and "lm-eval ls tasks" in message
    assert "'hellaswag'" not in message  # lm-eval's own tasks are known (their data is fetched only when run)
