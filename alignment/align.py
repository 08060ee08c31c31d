"""SFT and preference optimisation through TRL's trainers, under the factory's checkpoints.

    supervised_finetune(model_dir, rows, spec: SFTSpec, work_dir, callbacks) -> metrics
    optimize_preferences(model_dir, pairs, spec: PreferenceSpec, work_dir, callbacks) -> metrics

Both train the checkpoint in ``model_dir`` and write the result to ``work_dir/model`` (weights,
config, tokenizer with its chat template, ``measurements/training_history.json``). TRL does the
learning (``SFTTrainer``: loss on the assistant's reply only; ``DPOTrainer``: the DPO family of
losses against a frozen reference copy); the factory does the rest:

- **Checkpoints.** Every ``train.checkpoint_every`` steps the Trainer saves ``checkpoint-N``;
  ``SealCheckpoints`` moves it into ``checkpoints/step_N/hf_trainer/`` and seals it with the
  factory's marker (``model/checkpoint.py``), so the store mirrors it like any other and an
  interrupted run, here or on another machine, resumes from the newest whole one
  (``resume_from_checkpoint``: weights, optimizer, scheduler, RNG and data position).
- **The loop's knobs** are the factory's ``TrainSpec`` (``trainer_arguments``): the same global
  batch, micro batch, schedule and processes as pretraining and distillation. With
  ``num_processes > 1`` the stage launches torchrun and the Trainer runs DDP in it.
- **Measurements.** The held-out split is evaluated before training and after; each logged step
  reaches ``callbacks`` (MLflow, the Prefect progress) as the factory's loops' records do.

The data are the SDG stage's rows (``sdg/output.py``), turned into TRL's conversational
prompt-completion and preference formats, rendered with the model's chat template.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import TrainerCallback

from alignment.spec import PreferenceSpec, SFTSpec
from model.checkpoint import find_latest, seal_trainer_checkpoint
from model.contract import CHECKPOINTS_DIR, MODEL_DIR
from model.fsutil import atomic_write_text
from model.spec import TrainSpec
from model.train import HISTORY_FILE

TRAINER_OUTPUT = "trainer"  # where the Trainer saves before a checkpoint is sealed
BASELINE_FILE = "baseline_metrics.json"  # the held-out metrics before training, measured once per run
# Families whose forward rejects padded batches (Hymba's meta tokens lead every sequence):
# TRL's collators pad, so these are refused before any work.
UNPADDED_FAMILIES = {"hymba"}


# --------------------------------------------------------------------------------------
# Data: SDG rows -> TRL's conversational formats
# --------------------------------------------------------------------------------------


def sft_examples(rows: list[dict], source: str = "the SFT rows") -> list[dict]:
    """SDG ``sft`` rows (``messages`` ending with the assistant's reply) as TRL prompt-completion
    pairs: the reply is the completion, everything before it the prompt."""
    examples = []
    for i, row in enumerate(rows):
        messages = row.get("messages")
        if not isinstance(messages, list) or len(messages) < 2:
            raise ValueError(f"{source}: row {i} has no `messages` conversation (a list of at least 2 messages)")
        if messages[-1].get("role") != "assistant":
            raise ValueError(f"{source}: row {i}'s last message is {messages[-1].get('role')!r}, not the "
                             "assistant's reply")
        examples.append({"prompt": messages[:-1], "completion": messages[-1:]})
    return examples


def preference_examples(rows: list[dict], source: str = "the preference rows") -> list[dict]:
    """SDG ``preference`` rows as TRL conversational preference triples."""
    examples = []
    for i, row in enumerate(rows):
        missing = [c for c in ("prompt_messages", "chosen_response", "rejected_response") if row.get(c) is None]
        if missing:
            raise ValueError(f"{source}: row {i} lacks {', '.join(missing)}")
        if row["chosen_response"] == row["rejected_response"]:
            raise ValueError(f"{source}: row {i}'s chosen and rejected responses are the same text")
        examples.append({"prompt": row["prompt_messages"],
                         "chosen": [{"role": "assistant", "content": row["chosen_response"]}],
                         "rejected": [{"role": "assistant", "content": row["rejected_response"]}]})
    return examples


# --------------------------------------------------------------------------------------
# The factory's loop spec and checkpoints around a Trainer
# --------------------------------------------------------------------------------------


def trainer_arguments(config_class, train: TrainSpec, output_dir: Path, evaluate: bool, **method) -> object:
    """TRL's config (an HF ``TrainingArguments``) for a factory ``TrainSpec``: the same global
    batch (``micro_batch_size`` per process, accumulated to ``batch_size``), schedule and seed."""
    if train.parallelism == "fsdp":
        raise ValueError("align: train.parallelism 'fsdp' is not supported by the align stages yet; use 'ddp'")
    if train.precision == "fp8":
        raise ValueError("align: train.precision 'fp8' is not supported by the align stages; use 'bf16' or 'auto'")
    cuda = train.device == "cuda"
    schedules = {
        "cosine": ("cosine_with_min_lr", {"min_lr_rate": train.min_lr_ratio}),
        "constant": ("constant_with_warmup", {}),
        "wsd": ("warmup_stable_decay", {"num_decay_steps": max(1, round(train.decay_fraction * train.steps)),
                                        "min_lr_ratio": train.min_lr_ratio}),
    }
    scheduler, scheduler_kwargs = schedules[train.schedule]
    return config_class(
        output_dir=str(output_dir), max_steps=train.steps,
        per_device_train_batch_size=train.micro_batch_size, per_device_eval_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.accumulation_steps,
        learning_rate=train.lr, lr_scheduler_type=scheduler, lr_scheduler_kwargs=scheduler_kwargs,
        warmup_steps=train.warmup_steps, weight_decay=train.weight_decay,
        adam_beta1=train.betas[0], adam_beta2=train.betas[1], max_grad_norm=train.grad_clip,
        seed=train.seed, data_seed=train.seed,
        save_strategy="steps", save_steps=train.checkpoint_every, save_total_limit=None,
        eval_strategy="steps" if evaluate else "no", eval_steps=train.eval_every,
        logging_steps=1, report_to=[], use_cpu=not cuda,
        bf16=cuda and train.precision in ("auto", "bf16"),
        activation_checkpointing=train.activation_checkpointing,
        dataloader_num_workers=0, ddp_find_unused_parameters=False,
        **method,
    )


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class SealCheckpoints(TrainerCallback):
    """After each Trainer save (every process has written its share), rank 0 seals it as step N."""

    def __init__(self, root: Path, keep: int):
        self.root, self.keep = Path(root), keep

    def on_save(self, args, state, control, **kwargs):
        _barrier()
        if state.is_world_process_zero:
            saved = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            seal_trainer_checkpoint(saved, self.root, state.global_step, self.keep)
        _barrier()
        return control


class ForwardRecords(TrainerCallback):
    """The Trainer's logs as the factory's step records: ``step``, ``loss``, ``lr``, ``grad_norm``,
    ``val_loss`` and the method's own (DPO's ``rewards/margins``, ...), to ``callbacks``."""

    RENAMED = {"learning_rate": "lr", "eval_loss": "val_loss"}

    def __init__(self, callbacks: Sequence[Callable[[dict], None]]):
        self.callbacks = tuple(callbacks)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not ({"loss", "eval_loss"} & set(logs or {})):
            return control  # the run's closing summary (train_loss, total_flos) is not a step
        record = {"step": state.global_step}
        for name, value in logs.items():
            if _numeric(name, value):
                record[self.RENAMED.get(name, name)] = float(value)
        for callback in self.callbacks:
            callback(record)
        return control


def _dataset(examples: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(examples)


def _run(trainer_class, config_class, model_dir: Path, train_examples: list[dict], held_out: list[dict],
         train: TrainSpec, work_dir: Path, callbacks: Sequence[Callable[[dict], None]], needs_reference: bool,
         **method) -> dict:
    """Train ``model_dir`` with a TRL trainer, resuming from the newest sealed checkpoint; returns
    the held-out metrics before and after, and writes the trained model to ``work_dir/model``."""
    from model.architectures import load_pretrained, summarize_folder
    from model.device import DevicePolicy, inference_dtype

    family = summarize_folder(model_dir)["family"]
    if family in UNPADDED_FAMILIES:
        raise ValueError(f"align: {model_dir} is a {family} model, whose forward takes no padded batches; "
                         "TRL's trainers pad, so the align stages support nemotron_h models only")
    if not train_examples:
        raise ValueError("align: no training rows (all held out, or the data are empty)")
    if len(train_examples) < train.batch_size:
        warnings.warn(f"align: {len(train_examples)} training rows, fewer than one batch ({train.batch_size}): every "
                      f"step sees the same rows; {train.steps} steps will overfit them", stacklevel=2)
    if not held_out:
        warnings.warn("align: no held-out rows (too few rows for held_out_fraction): no before/after measurement",
                      stacklevel=2)
    train = train.model_copy(update={"device": DevicePolicy().choose(train.device, "align train.device")})
    work_dir = Path(work_dir)
    model, tokenizer = load_pretrained(model_dir, dtype=torch.float32)  # master weights; bf16 is autocast
    # The reference only runs forward: in the inference dtype (bfloat16 on CUDA), half the memory.
    reference = load_pretrained(model_dir, dtype=inference_dtype(train.device))[0].eval() if needs_reference else None
    args = trainer_arguments(config_class, train, work_dir / TRAINER_OUTPUT, evaluate=bool(held_out), **method)
    trainer = trainer_class(
        model=model, args=args, train_dataset=_dataset(train_examples),
        eval_dataset=_dataset(held_out) if held_out else None, processing_class=tokenizer,
        callbacks=[SealCheckpoints(work_dir / CHECKPOINTS_DIR, train.keep_checkpoints), ForwardRecords(callbacks)],
        **({"ref_model": reference} if needs_reference else {}),
    )
    main = trainer.is_world_process_zero()
    baseline_path = work_dir / BASELINE_FILE
    latest = find_latest(work_dir / CHECKPOINTS_DIR)
    if held_out and not baseline_path.is_file():  # before any step: the base model's held-out metrics
        baseline = _held_out_metrics(trainer, "before")
        if main:
            atomic_write_text(baseline_path, json.dumps(baseline))
    if latest is not None and main:
        print(f"align: resuming from {latest.path} (step {latest.step} of {train.steps})")
    trainer.train(resume_from_checkpoint=str(latest.trainer_folder) if latest is not None else None)
    metrics = {}
    if held_out:
        metrics |= json.loads(baseline_path.read_text()) | _held_out_metrics(trainer, "after")
    metrics |= {"train_rows": float(len(train_examples)), "held_out_rows": float(len(held_out))}
    if main:
        out = work_dir / MODEL_DIR
        trainer.save_model(str(out))
        tokenizer.save_pretrained(out)
        history = [entry for entry in trainer.state.log_history if "loss" in entry]
        (out / HISTORY_FILE).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / HISTORY_FILE, json.dumps({"metrics": metrics, "history": history}))
    _barrier()
    return metrics


# Trainer bookkeeping, not measurements of the model.
_NOT_METRICS = ("_runtime", "_per_second", "epoch", "model_preparation_time", "num_tokens")


def _numeric(name: str, value) -> bool:
    return isinstance(value, (int, float)) and not name.endswith(_NOT_METRICS)


def _held_out_metrics(trainer, when: str) -> dict[str, float]:
    """``trainer.evaluate()`` on the held-out rows as ``{when}_loss``, ``{when}_rewards/margins``, ...
    (TRL names its own metrics ``eval_*`` whatever the prefix asked for), plus, for preference
    pairs, ``{when}_logps_margin``: the mean log-probability of chosen minus rejected replies,
    the model's own preference (a DPO reward margin is 0 by definition before training)."""
    metrics = {}
    for name, value in trainer.evaluate(metric_key_prefix=when).items():
        if _numeric(name, value):
            metrics[f"{when}_{name.split('_', 1)[1] if name.startswith(('eval_', f'{when}_')) else name}"] = float(value)
    if f"{when}_logps/chosen" in metrics:
        metrics[f"{when}_logps_margin"] = metrics[f"{when}_logps/chosen"] - metrics[f"{when}_logps/rejected"]
    return metrics


def supervised_finetune(model_dir: Path, rows: list[dict], held_out_rows: list[dict], spec: SFTSpec,
                        work_dir: Path, callbacks: Sequence[Callable[[dict], None]] = ()) -> dict:
    """SFT of ``model_dir`` on SDG ``sft`` rows; metrics ``before_loss`` / ``after_loss`` are the
    held-out rows' loss on the reply tokens, before and after."""
    from trl import SFTConfig, SFTTrainer

    return _run(SFTTrainer, SFTConfig, model_dir, sft_examples(rows), sft_examples(held_out_rows, "held-out rows"),
                spec.train, work_dir, callbacks, needs_reference=False,
                max_length=spec.max_length, completion_only_loss=True, packing=False)


def optimize_preferences(model_dir: Path, pairs: list[dict], held_out_pairs: list[dict], spec: PreferenceSpec,
                         work_dir: Path, callbacks: Sequence[Callable[[dict], None]] = ()) -> dict:
    """DPO (or another of TRL's preference losses) of ``model_dir`` on SDG ``preference`` pairs;
    held-out metrics before and after: ``*_rewards/margins`` (the implicit reward's
    chosen-minus-rejected margin), ``*_rewards/accuracies`` and ``*_logps/chosen|rejected``."""
    from trl import DPOConfig, DPOTrainer

    return _run(DPOTrainer, DPOConfig, model_dir, preference_examples(pairs),
                preference_examples(held_out_pairs, "held-out pairs"), spec.train, work_dir, callbacks,
                needs_reference=True, max_length=spec.max_length, beta=spec.beta, loss_type=list(spec.loss),
                loss_weights=list(spec.loss_weights) if spec.loss_weights else None)
