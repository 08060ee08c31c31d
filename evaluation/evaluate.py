"""Measure checkpoints, write the report, apply the gate: plain functions over folders.

    evaluate_checkpoint(folder, spec, ...)   one model -> its nested result (plain dict)
    evaluate_folders({label: folder}, ...)   a teacher and candidates -> report folder + Results

``factory evaluate-model`` calls ``evaluate_folders`` on any checkpoint; the evaluate stage
(``evaluation/evaluate_stage.py``) calls it on the recipe's teacher and students.

One model's result::

    {"model":      {"path", "family", "parameters", "layer_pattern"},
     "quality":    {"val_loss", "val_perplexity", "val_token_accuracy", "val_tokens",
                    "kl_to_teacher", "greedy_agreement", "greedy_prefix_match"},   # students
     "tasks":      {task: {metric: value}},                    # lm-eval, hf model type
     "recall":     {"mqar": [{seq_len, num_kv_pairs, accuracy, chance}], "passkey": [...]},
     "efficiency": {"device", "dtype", "clock", "points": [{batch_size, context_length,
                    prefill_tokens_per_s, decode_tokens_per_s, cache_bytes_per_sequence, ...}]},
     "skipped":    {section: why}}

"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from evaluation.gate import GateResult, apply_gate, headline
from evaluation.harness import LOCAL_TAG, LOCAL_TASKS, run_lm_eval, task_manager, write_local_tasks
from evaluation.quality import check_same_tokenizer, measure_quality
from evaluation.recall import evaluate_mqar, evaluate_passkey, passkey_problems
from evaluation.report import write_report
from evaluation.spec import EvaluateSpec
from model.architectures import FAMILIES
from model.device import DevicePolicy, inference_dtype
from model.efficiency import measure_efficiency, resolve_dtype
from model.tokenizer import load_tokenizer
from model.train import read_history

TEACHER = "teacher"


# --------------------------------------------------------------------------------------
# Checkpoint folders
# --------------------------------------------------------------------------------------


def checkpoint_problems(folder: Path) -> list[str]:
    """What a checkpoint folder lacks to be evaluated (config, weights, tokenizer); empty when whole."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    problems = []
    if not (folder / "config.json").is_file():
        problems.append("config.json (the model config)")
    if not any(folder.glob("*.safetensors")):
        problems.append("*.safetensors (the weights)")
    if not (folder / "tokenizer.json").is_file():
        problems.append("tokenizer.json (the tokenizer)")
    return [f"{folder} is missing {', '.join(problems)}"] if problems else []


def check_checkpoints(folders: dict[str, Path]) -> None:
    problems = [p for folder in folders.values() for p in checkpoint_problems(folder)]
    if problems:
        raise FileNotFoundError("not a whole checkpoint folder (save_pretrained + tokenizer): " + "; ".join(problems))


def load_checkpoint(folder: Path, device: torch.device, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a checkpoint folder, through transformers' Auto classes, in the
    device's inference dtype (bfloat16 on CUDA) unless ``dtype`` says otherwise.

    On CUDA, weights larger than 90% of the device's free memory are spread over every visible
    GPU and then the CPU (accelerate's ``device_map="auto"``) instead of failing to load: a 56B
    teacher is 112 GB in bfloat16."""
    from transformers import AutoModelForCausalLM

    dtype = dtype or inference_dtype(device)
    if device.type == "cuda" and _weight_bytes(folder, dtype) > 0.9 * torch.cuda.mem_get_info(device)[0]:
        print(f"{folder}: weights exceed the free memory of {device}; spreading them with device_map='auto'",
              file=sys.stderr)
        net = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="auto").eval()
    else:
        net = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    return net, load_tokenizer(folder)


def _weight_bytes(folder: Path, dtype: torch.dtype) -> int:
    """Bytes of a checkpoint's weights once loaded in ``dtype``, from the safetensors headers alone."""
    from safetensors import safe_open

    count = 0
    for path in Path(folder).glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            count += sum(torch.Size(f.get_slice(name).get_shape()).numel() for name in f.keys())
    return count * dtype.itemsize


def describe(net, folder: Path) -> dict:
    config = net.config
    family = FAMILIES.get(getattr(config, "model_type", ""))
    info = family.summarize(config) if family else {"family": config.model_type,
                                                    "parameters": sum(p.numel() for p in net.parameters())}
    return {"path": str(folder), "family": info["family"], "parameters": int(info["parameters"]),
            "layer_pattern": info.get("layer_pattern", "")}


# --------------------------------------------------------------------------------------
# One checkpoint
# --------------------------------------------------------------------------------------


def evaluate_checkpoint(folder: Path, spec: EvaluateSpec, work_dir: Path, data_dir: Path | None = None,
                        teacher_dir: Path | None = None, label: str = "model",
                        device_policy: DevicePolicy | None = None) -> dict:
    """Every section of ``spec.sections`` for one checkpoint; the teacher (if any) for KL and agreement."""
    folder = Path(folder)
    work_dir = Path(work_dir)
    device = (device_policy or DevicePolicy()).resolve(spec.device, "evaluate.device")
    dtype = resolve_dtype(spec.efficiency.dtype, device)
    result: dict = {"skipped": {}}

    if "tasks" in spec.sections:
        tasks_dir = work_dir / "tasks"
        write_local_tasks(tasks_dir, spec.tasks.local_items, spec.tasks.seed)
        print(f"[{label}] lm-eval tasks {', '.join(spec.tasks.names)}", file=sys.stderr)
        result["tasks"] = run_lm_eval(folder, spec.tasks.names, task_manager(tasks_dir), spec.tasks.num_fewshot,
                                      spec.tasks.limit, spec.tasks.batch_size, device.type,
                                      str(dtype).removeprefix("torch."), work_dir / f"lm_eval-{label}.json")

    net, tokenizer = load_checkpoint(folder, device)  # the inference dtype; efficiency casts to its own
    result["model"] = describe(net, folder)
    if "quality" in spec.sections:
        if data_dir is None:
            result["skipped"]["quality"] = "no validation data (run inside a recipe, or pass --data)"
        else:
            print(f"[{label}] quality on {data_dir}", file=sys.stderr)
            teacher = load_checkpoint(teacher_dir, device)[0] if teacher_dir is not None else None
            result["quality"] = measure_quality(net, data_dir, spec.quality, teacher, tokenizer.pad_token_id, device)
            del teacher
    if "recall" in spec.sections:
        print(f"[{label}] recall: MQAR and passkey", file=sys.stderr)
        r = spec.recall
        first_id = max(i for i in (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None) + 1
        result["recall"] = {
            "mqar": evaluate_mqar(net, r.mqar_seq_lens, r.mqar_kv_pairs, r.mqar_examples, r.seed,
                                  first_id=first_id, batch_size=r.batch_size, device=device),
            "passkey": evaluate_passkey(net, tokenizer, r.passkey_context_lengths, r.passkey_trials, r.seed,
                                        r.passkey_digits, device),
        }
    if "efficiency" in spec.sections:
        print(f"[{label}] efficiency on {device.type}, {dtype}", file=sys.stderr)
        e = spec.efficiency
        threads = torch.get_num_threads()
        torch.set_num_threads(e.threads or threads)
        try:
            result["efficiency"] = measure_efficiency(net.to(dtype), e.batch_sizes, e.context_lengths, e.decode_tokens,
                                                      e.warmup, e.repeats, device)
        finally:
            torch.set_num_threads(threads)
    return result


# --------------------------------------------------------------------------------------
# A teacher and its candidates
# --------------------------------------------------------------------------------------


class Results(BaseModel):
    """What an evaluation found: headline metrics per model and the gate per candidate."""

    teacher: str | None = None  # its label
    models: dict[str, str] = Field(default_factory=dict)  # label -> checkpoint (a folder here, a digest in a ref)
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict)  # label -> headline scalars
    gates: dict[str, GateResult] = Field(default_factory=dict)  # candidate label -> gate result

    @property
    def passed(self) -> list[str]:
        """Candidates that pass the gate."""
        return [label for label, gate in self.gates.items() if gate.passed]


def check_inputs(spec: EvaluateSpec, folders: dict[str, Path], teacher: str | None, data_dir: Path | None) -> None:
    """Every error we can find before loading a model: folders, tokenizers, task names."""
    check_checkpoints(folders)
    for label, folder in folders.items():
        teacher_dir = folders[teacher] if teacher and label != teacher else None
        check_same_tokenizer(folder, data_dir if "quality" in spec.sections else None, teacher_dir)
    if "recall" in spec.sections:
        for folder in folders.values():
            problems = passkey_problems(load_tokenizer(folder), spec.recall.passkey_context_lengths, spec.recall.passkey_digits)
            if problems:
                raise ValueError(f"evaluate.recall.passkey_context_lengths: {problems[0]} ({folder})")
    if "tasks" in spec.sections:
        local = set(LOCAL_TASKS) | {LOCAL_TAG}
        if not set(spec.tasks.names) <= local:  # lm-eval's own index takes seconds to build: only when needed
            from evaluation.harness import check_task_names

            check_task_names([n for n in spec.tasks.names if n not in local], task_manager())


def evaluate_folders(folders: dict[str, Path], spec: EvaluateSpec, out_dir: Path, teacher: str | None = None,
                     data_dir: Path | None = None, cached: dict[str, dict] | None = None,
                     on_result=None, device_policy: DevicePolicy | None = None) -> Results:
    """Evaluate every checkpoint in ``folders`` ({label: folder}), write the report to
    ``out_dir`` and gate every candidate against ``teacher`` (a label in ``folders``).

    ``cached`` holds results measured before ({label: result}); ``on_result(label, result)``
    is called after each new measurement (the stage stores it)."""
    folders = {label: Path(folder) for label, folder in folders.items()}
    if teacher is not None and teacher not in folders:
        raise ValueError(f"teacher {teacher!r} is not one of the models {sorted(folders)}")
    check_inputs(spec, folders, teacher, data_dir)
    cached = dict(cached or {})
    results = {}
    for label, folder in folders.items():
        if label not in cached:
            teacher_dir = folders[teacher] if teacher and label != teacher else None
            cached[label] = evaluate_checkpoint(folder, spec, Path(out_dir) / "work", data_dir, teacher_dir, label,
                                                device_policy)
            if on_result is not None:
                on_result(label, cached[label])
        results[label] = cached[label]
    gates = {label: apply_gate(spec.gate, results[label], results.get(teacher) if teacher else None)
             for label in folders if label != teacher}
    histories = {label: read_history(folder)["history"] for label, folder in folders.items()}
    write_report(results, out_dir, teacher, gates, histories)
    return Results(teacher=teacher, models={label: str(f) for label, f in folders.items()},
                   metrics={label: headline(r) for label, r in results.items()}, gates=gates)
