"""The evaluate stage: measure checkpoints, write the report, apply the gate.

    evaluate_checkpoint(folder, spec, ...)   one model -> its nested result (plain dict)
    evaluate_folders({label: folder}, ...)   a teacher and candidates -> report folder + gates
    run_evaluate(spec, inputs, store)        the stage contract: refs in, an EvaluationRef out

One model's result::

    {"model":      {"path", "family", "parameters", "layer_pattern"},
     "quality":    {"val_loss", "val_perplexity", "val_token_accuracy", "val_tokens",
                    "kl_to_teacher", "greedy_agreement", "greedy_prefix_match"},   # students
     "tasks":      {task: {metric: value}},                    # lm-eval, hf model type
     "recall":     {"mqar": [{seq_len, num_kv_pairs, accuracy, chance}], "passkey": [...]},
     "efficiency": {"device", "dtype", "clock", "points": [{batch_size, context_length,
                    prefill_tokens_per_s, decode_tokens_per_s, cache_bytes_per_sequence, ...}]},
     "skipped":    {section: why}}

``run_evaluate`` keeps each model's result as a ref keyed by (model digest, teacher digest,
data digest, the measured sections of the spec, code), so re-running a recipe measures
nothing again, and adding a student measures only that student; the gate is applied on
every run (changing a threshold re-measures nothing).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from pydantic import BaseModel, Field

import model.evaluation.efficiency
import model.evaluation.harness
import model.evaluation.quality
import model.evaluation.recall
from model.architectures import FAMILIES
from model.contract import DataRef, Lineage, ModelRef, code_digest, json_digest
from model.evaluation.efficiency import measure_efficiency, resolve_device, resolve_dtype
from model.evaluation.gate import GateResult, apply_gate, headline
from model.evaluation.harness import LOCAL_TAG, LOCAL_TASKS, run_lm_eval, task_manager, write_local_tasks
from model.evaluation.quality import check_same_tokenizer, measure_quality
from model.evaluation.recall import evaluate_mqar, evaluate_passkey, passkey_problems
from model.evaluation.report import write_report
from model.evaluation.spec import EvaluateSpec
from model.tokenizer import load_tokenizer

HISTORY_FILE = "training_history.json"
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


def load_checkpoint(folder: Path, device: torch.device, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a checkpoint folder, through transformers' Auto classes."""
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    return net, load_tokenizer(folder)


def describe(net, folder: Path) -> dict:
    config = net.config
    family = FAMILIES.get(getattr(config, "model_type", ""))
    info = family.summarize(config) if family else {"family": config.model_type,
                                                    "parameters": sum(p.numel() for p in net.parameters())}
    return {"path": str(folder), "family": info["family"], "parameters": int(info["parameters"]),
            "layer_pattern": info.get("layer_pattern", "")}


def read_history(folder: Path) -> list[dict]:
    path = Path(folder) / HISTORY_FILE
    return json.loads(path.read_text()).get("history", []) if path.is_file() else []


# --------------------------------------------------------------------------------------
# One checkpoint
# --------------------------------------------------------------------------------------


def evaluate_checkpoint(folder: Path, spec: EvaluateSpec, work_dir: Path, data_dir: Path | None = None,
                        teacher_dir: Path | None = None, label: str = "model") -> dict:
    """Every section of ``spec.sections`` for one checkpoint; the teacher (if any) for KL and agreement."""
    folder = Path(folder)
    work_dir = Path(work_dir)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.efficiency.dtype, device)
    result: dict = {"skipped": {}}

    if "tasks" in spec.sections:
        tasks_dir = work_dir / "tasks"
        write_local_tasks(tasks_dir, spec.tasks.local_items, spec.tasks.seed)
        print(f"[{label}] lm-eval tasks {', '.join(spec.tasks.names)}", file=sys.stderr)
        result["tasks"] = run_lm_eval(folder, spec.tasks.names, task_manager(tasks_dir), spec.tasks.num_fewshot,
                                      spec.tasks.limit, spec.tasks.batch_size, device.type,
                                      str(dtype).removeprefix("torch."), work_dir / f"lm_eval-{label}.json")

    net, tokenizer = load_checkpoint(folder, device)  # float32 for quality and recall; efficiency casts
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


class Evaluation(BaseModel):
    """What ``evaluate_folders`` and ``run_evaluate`` return."""

    uri: str  # the report folder: metrics.json, report.md, plots/
    digest: str = ""
    teacher: str | None = None  # its label
    models: dict[str, str] = Field(default_factory=dict)  # label -> checkpoint digest (or path)
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict)  # label -> headline scalars
    gates: dict[str, GateResult] = Field(default_factory=dict)  # candidate label -> gate result
    lineage: Lineage | None = None

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
            from model.evaluation.harness import check_task_names

            check_task_names([n for n in spec.tasks.names if n not in local], task_manager())


def evaluate_folders(folders: dict[str, Path], spec: EvaluateSpec, out_dir: Path, teacher: str | None = None,
                     data_dir: Path | None = None, cached: dict[str, dict] | None = None,
                     on_result=None) -> Evaluation:
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
            cached[label] = evaluate_checkpoint(folder, spec, Path(out_dir) / "work", data_dir, teacher_dir, label)
            if on_result is not None:
                on_result(label, cached[label])
        results[label] = cached[label]
    gates = {label: apply_gate(spec.gate, results[label], results.get(teacher) if teacher else None)
             for label in folders if label != teacher}
    histories = {label: read_history(folder) for label, folder in folders.items()}
    write_report(results, out_dir, teacher, gates, histories)
    return Evaluation(uri=str(out_dir), teacher=teacher, models={label: str(f) for label, f in folders.items()},
                      metrics={label: headline(r) for label, r in results.items()}, gates=gates)


# --------------------------------------------------------------------------------------
# The stage contract
# --------------------------------------------------------------------------------------


class ModelResult(BaseModel):
    """One model's measured result, kept as a ref so a re-run measures nothing."""

    model_digest: str
    label: str
    result: dict


def model_label(ref: ModelRef) -> str:
    """A readable name for a checkpoint: its stage folder (``.../distill/tiny-50pct-ab12/model`` -> ``tiny-50pct-ab12``)."""
    path = Path(ref.uri.rstrip("/"))
    return path.parent.name if path.name == "model" else path.name


def _measured_spec(spec: EvaluateSpec) -> dict:
    """The part of the spec that changes measurements (not the gate)."""
    return spec.model_dump(mode="json", exclude={"gate"})


def run_evaluate(spec: EvaluateSpec, inputs: dict, store, name: str = "evaluate") -> Evaluation:
    """Evaluate ``inputs['models']`` (a ModelRef or a list of them) against ``inputs['teacher']``
    (optional) on the validation split of ``inputs['data']`` (optional DataRef); publish the
    report folder and return an Evaluation with per-model metrics and gate results."""
    candidates = inputs.get("models") or inputs.get("model")
    candidates = [candidates] if isinstance(candidates, ModelRef) else list(candidates or [])
    teacher_ref: ModelRef | None = inputs.get("teacher")
    data_ref: DataRef | None = inputs.get("data")
    if not candidates and teacher_ref is None:
        raise ValueError("run_evaluate needs inputs['models'] (ModelRef or list) and/or inputs['teacher']")
    refs = ([(TEACHER, teacher_ref)] if teacher_ref else []) + [(model_label(r), r) for r in candidates]
    labels = [label for label, _ in refs]
    if len(set(labels)) != len(labels):
        refs = [(f"{label}-{i}" if labels.count(label) > 1 else label, r) for i, (label, r) in enumerate(refs)]

    code = code_digest(model.evaluation.quality, model.evaluation.recall, model.evaluation.efficiency,
                       model.evaluation.harness, sys.modules[__name__])
    measured = json_digest(_measured_spec(spec))
    data_digest = data_ref.digest if data_ref else ""
    teacher_digest = teacher_ref.digest if teacher_ref else ""

    def result_key(label: str, ref: ModelRef) -> str:
        parts = [ref.digest, data_digest, teacher_digest if label != TEACHER else "", measured, code]
        return f"evaluate/models/{json_digest(parts)[:24]}"

    cached = {}
    for label, ref in refs:
        hit = store.read_ref(result_key(label, ref), ModelResult)
        if hit is not None:
            cached[label] = hit.result
    refs_by_label = dict(refs)

    def keep(label: str, result: dict) -> None:
        ref = refs_by_label[label]
        store.write_ref(result_key(label, ref), ModelResult(model_digest=ref.digest, label=label, result=result))

    run_key = json_digest([sorted((label, r.digest) for label, r in refs), data_digest, measured, code,
                           spec.gate.model_dump(mode="json")])
    out_dir = store.stage_dir("evaluate", f"{name}-{run_key[:12]}")
    folders = {label: store.fetch(r.uri) for label, r in refs}
    data_dir = store.fetch(data_ref.uri) if data_ref else None
    evaluation = evaluate_folders(folders, spec, out_dir / "report", TEACHER if teacher_ref else None, data_dir,
                                  cached, keep)
    uri = store.publish(out_dir / "report", f"evaluate/{name}-{run_key[:12]}/report")
    return evaluation.model_copy(update={
        "uri": uri, "digest": store.published_digest(uri),
        "models": {label: r.digest for label, r in refs},
        "lineage": Lineage(stage="evaluate", spec_digest=json_digest(spec), code_digest=code,
                           parents=[r.digest for _, r in refs] + ([data_digest] if data_digest else []),
                           recipe_name=name),
    })
