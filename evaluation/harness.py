"""Standard benchmarks through lm-evaluation-harness, and the local tasks that exercise it offline.

A checkpoint folder goes to lm-eval's standard ``hf`` model type as it is
(``pretrained=<folder>``), exactly what ``lm_eval --model hf`` does: no wrapper model of
ours, so any task a user knows (mmlu, hellaswag, arc_easy, piqa, winogrande, gsm8k, ruler)
runs the same here as on their cluster, given its dataset.

``write_local_tasks`` generates a few small tasks (YAML + JSONL, tag ``factory_local``)
into a folder that is handed to lm-eval's ``TaskManager(include_path=...)``:

    factory_kv_recall   multiple choice: which value did a name get in a short list
    factory_arithmetic  multiple choice: the sum of two numbers among near misses
    factory_copy        loglikelihood: the next word of a word sequence seen before

``score_local_task`` scores the same items with our own log-likelihood code (the
tokenization lm-eval uses: the context, then the whole text, the continuation being the
extra tokens), so a test can hold lm-eval's accuracy equal to ours.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

LOCAL_TAG = "factory_local"
LOCAL_TASKS = ("factory_kv_recall", "factory_arithmetic", "factory_copy")

_WORDS = ("apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "castle", "forest", "rocket", "candle",
          "garden", "silver", "window", "planet", "bridge", "coffee", "dragon", "engine", "falcon", "guitar",
          "harbor", "island", "jacket", "kitten", "ladder", "marble", "needle", "orange", "pepper", "rabbit",
          "saddle", "tunnel", "velvet", "wallet", "yellow", "anchor", "basket", "carpet", "desert", "feather",
          "hammer", "jungle", "magnet", "napkin", "pillow", "ribbon", "spider", "thread", "violin")


class UnknownTaskError(ValueError):
    """A task name lm-eval does not know; the message lists close matches."""


# --------------------------------------------------------------------------------------
# Local tasks: generated, deterministic, offline
# --------------------------------------------------------------------------------------


def _kv_recall(rng: np.random.Generator) -> dict:
    names = rng.choice(_WORDS, size=4, replace=False)
    values = rng.choice(np.arange(10, 100), size=4, replace=False)
    listing = ", ".join(f"{n} = {v}" for n, v in zip(names, values, strict=True))
    asked = int(rng.integers(4))
    return {"context": f"Values: {listing}.\nQuestion: what is {names[asked]}?\nAnswer:",
            "choices": [str(v) for v in values], "label": asked}


def _arithmetic(rng: np.random.Generator) -> dict:
    a, b = (int(x) for x in rng.integers(10, 50, size=2))
    wrong = rng.choice([d for d in (-10, -2, -1, 1, 2, 10)], size=3, replace=False)
    choices = [a + b] + [a + b + int(d) for d in wrong]
    order = rng.permutation(4)
    return {"context": f"Question: {a} + {b} =\nAnswer:", "choices": [str(choices[i]) for i in order],
            "label": int(np.argmax(order == 0))}


def _copy(rng: np.random.Generator) -> dict:
    words = list(rng.choice(_WORDS, size=8, replace=False))
    cut = int(rng.integers(3, 8))
    return {"context": " ".join(words) + ". Again: " + " ".join(words[:cut]), "target": words[cut]}


_GENERATORS = {"factory_kv_recall": _kv_recall, "factory_arithmetic": _arithmetic, "factory_copy": _copy}


def _task_yaml(name: str, data_file: Path) -> dict:
    common = {"task": name, "tag": [LOCAL_TAG], "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(data_file)}}, "test_split": "test",
              "doc_to_text": "{{context}}", "metadata": {"version": 1.0}}
    if name == "factory_copy":
        return common | {"output_type": "loglikelihood", "doc_to_target": "{{target}}",
                         "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                         {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}]}
    return common | {"output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "label",
                     "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                     for m in ("acc", "acc_norm")]}


def write_local_tasks(folder: Path, items: int = 64, seed: int = 0) -> list[str]:
    """Write every local task (``<name>.jsonl`` and ``<name>.yaml``) into ``folder``; returns their names."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(LOCAL_TASKS):
        rng = np.random.default_rng([seed, index])
        docs = [_GENERATORS[name](rng) for _ in range(items)]
        data_file = folder / f"{name}.jsonl"
        data_file.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(_task_yaml(name, data_file), sort_keys=False))
    return list(LOCAL_TASKS)


def read_local_task(folder: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / f"{name}.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------
# Our own log-likelihood scoring (the check on the lm-eval path)
# --------------------------------------------------------------------------------------


@torch.no_grad()
def continuation_logprob(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) summed over its tokens, and whether every token is the argmax.

    Tokenized as lm-eval does: ``context`` alone, then ``context + continuation``; the
    continuation is the tokens past the context's length."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole_ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    target_ids = torch.tensor(whole_ids[len(context_ids) :])
    ids = torch.tensor([whole_ids[:-1]], device=next(model.parameters()).device)
    logits = model(input_ids=ids).logits[0, len(context_ids) - 1 :].float().cpu()  # (T, V)
    logp = F.log_softmax(logits, dim=-1)
    return logp.gather(1, target_ids[:, None]).sum().item(), bool((logits.argmax(-1) == target_ids).all())


def score_local_task(model, tokenizer, folder: Path, name: str) -> dict[str, float]:
    """Accuracy of ``model`` on a generated task, by our own log-likelihood scoring."""
    model.eval()
    docs = read_local_task(folder, name)
    if name == "factory_copy":
        greedy = [continuation_logprob(model, tokenizer, d["context"], " " + d["target"])[1] for d in docs]
        return {"acc": float(np.mean(greedy))}
    acc, acc_norm = [], []
    for d in docs:
        scores = np.array([continuation_logprob(model, tokenizer, d["context"], " " + c)[0] for c in d["choices"]])
        lengths = np.array([len(" " + c) for c in d["choices"]])  # lm-eval normalizes by characters
        acc.append(int(np.argmax(scores)) == d["label"])
        acc_norm.append(int(np.argmax(scores / lengths)) == d["label"])
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm))}


# --------------------------------------------------------------------------------------
# lm-eval
# --------------------------------------------------------------------------------------


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("the tasks section needs lm-evaluation-harness: pip install -e '.[eval]'") from e
    return lm_eval, TaskManager


def task_manager(tasks_dir: Path | None = None):
    """lm-eval's TaskManager over its own tasks plus ours (``tasks_dir``)."""
    _, TaskManager = _lm_eval()
    return TaskManager(include_path=str(tasks_dir) if tasks_dir else None)


def check_task_names(names: list[str], manager) -> None:
    """Every name is a task, group or tag lm-eval knows, or a task YAML file; else UnknownTaskError."""
    if not names:
        raise UnknownTaskError("no tasks given")
    known = set(manager.all_tasks)
    problems = []
    for name in names:
        if name in known or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            continue
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `lm-eval ls tasks` lists them"
        problems.append(f"unknown lm-eval task {name!r}{hint}")
    if problems:
        raise UnknownTaskError("\n".join(problems))


def run_lm_eval(model_dir: Path, names: list[str], manager, num_fewshot: int | None = None,
                limit: int | None = None, batch_size: int = 8, device: str = "cpu", dtype: str = "float32",
                output_path: Path | None = None) -> dict[str, dict[str, float]]:
    """Run lm-eval's ``hf`` model on a checkpoint folder; returns {task: {metric: value}}.

    ``output_path`` receives lm-eval's whole result record (configs, versions, n-samples)."""
    lm_eval, _ = _lm_eval()
    check_task_names(names, manager)
    # lm-eval's hf model reads weights and tokenizer from the folder through transformers.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # lm-eval bootstraps standard errors in a forked multiprocessing.Pool unless told not to.
    # Forking a process that runs Prefect's and MLflow's threads is unsafe, and the pool's
    # terminate() raced with a worker still in its at-fork hooks, where Prefect's inherited
    # SIGTERM handler swallowed the signal: `make demo` hung forever. In-process is cheap.
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "dtype": dtype}, tasks=list(names),
        num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, device=device, task_manager=manager,
        log_samples=False, bootstrap_iters=1000,
    )
    if output_path is not None:
        record = {k: results[k] for k in ("results", "configs", "versions", "n-shot", "n-samples") if k in results}
        Path(output_path).write_text(json.dumps(record, indent=1, default=str))
    scores = {}
    for task, metrics in results["results"].items():
        scores[task] = {key.split(",")[0]: float(value) for key, value in metrics.items()
                        if "," in key and isinstance(value, int | float)}
    return scores
