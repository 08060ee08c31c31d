"""The training loop, readable top to bottom (nanoGPT's shape, torchtune's explicitness).

    for each optimizer step:
        take the step's global batch from the data order (derived from the step number)
        split it across processes and micro-batches; forward, loss, backward
        stop on a non-finite loss; clip; AdamW step; LR schedule step
        every eval_every steps: validation loss
        every checkpoint_every steps: an atomic checkpoint (model/checkpoint.py; sharded under FSDP)

Pretraining and distillation share this loop; they differ only in ``loss_fn``.

Determinism: the data order is a function of (seed, step), the checkpoint holds weights,
optimizer, scheduler and RNG state, so a resumed run reaches the same weights as an
uninterrupted one. The loss of a step is the sum of per-token losses over the whole global
batch divided by its number of target tokens, however the batch is split across processes
and micro-batches, so 1 process and N processes follow the same curve, replicated (DDP) or
sharded (FSDP, ``train.parallelism``).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from model import distributed
from model.checkpoint import find_latest, load_checkpoint, save_checkpoint
from model.contract import CHECKPOINTS_DIR, StepCallback
from model.data import PackedTokens
from model.device import autocast, enable_tf32, training_precision, weights_dtype
from model.digests import MEASUREMENTS_DIR
from model.fsutil import atomic_write_text
from model.losses import lm_loss
from model.spec import TrainSpec

# (model, input_ids (B, L), target_mask (B, L-1)) -> sum of per-token losses over the targets
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
# In a trained checkpoint folder: the final metrics and every step's record, wall-clock tokens/s included,
# so it sits with the measurements, outside the checkpoint's digest (model/digests.py).
HISTORY_FILE = f"{MEASUREMENTS_DIR}/training_history.json"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def lr_factor(step: int, spec: TrainSpec) -> float:
    """Multiplier on ``spec.lr`` for the 0-based optimizer step: linear warmup, then
    cosine to ``min_lr_ratio``, WSD (constant, then a linear decay over the last
    ``decay_fraction`` of steps), or constant."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    if spec.schedule == "constant":
        return 1.0
    if spec.schedule == "cosine":
        progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = spec.steps - max(1, int(spec.decay_fraction * spec.steps))
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(1, spec.steps - decay_start)
    return 1.0 - (1.0 - spec.min_lr_ratio) * min(1.0, progress)


@lru_cache(maxsize=4)
def _epoch_order(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=generator)


def global_batch(step: int, batch_size: int, num_rows: int, seed: int) -> list[int]:
    """Row indices of step ``step``'s global batch: consecutive slices of per-epoch shuffles,
    so every row is seen exactly once per epoch."""
    rows = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, num_rows)
        rows.append(int(_epoch_order(num_rows, seed, epoch)[offset]))
    return rows


def _optimizer(model: torch.nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    # Decay matrices and embeddings; not norms, biases or the per-head SSM scalars (A_log, D, dt_bias).
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas)


def _checkpoint_blocks(model: torch.nn.Module) -> None:
    """transformers' activation (gradient) checkpointing of every decoder block, non-reentrant (FSDP2-safe);
    ``activation_checkpointing_enable`` in newer transformers, ``gradient_checkpointing_enable`` in older."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _float8(model: torch.nn.Module) -> None:
    """Swap the decoder's linear layers for torchao's float8 training linears, in place (before FSDP
    wraps them). The output head stays in bfloat16: its (tokens, vocabulary) product is where float8
    rounding hurts the loss most, and common float8 recipes leave it out too."""
    from torchao.float8 import convert_to_float8_training

    def eligible(module: torch.nn.Module, name: str) -> bool:
        # float8 matmuls need both dimensions divisible by 16
        return (isinstance(module, torch.nn.Linear) and name != "lm_head"
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    convert_to_float8_training(model, module_filter_fn=eligible)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, data: PackedTokens, rows: Sequence[int], micro_batch_size: int,
                  loss_fn: LossFn = lm_loss, device: torch.device | None = None,
                  precision: str = "auto", d: distributed.Dist | None = None) -> float:
    """Mean per-token loss over ``rows`` (split across processes when distributed). ``device``
    defaults to the model's own."""
    device = device or next(model.parameters()).device
    precision = training_precision(precision, device)
    d = d or distributed.Dist(device=device)
    was_training = model.training
    model.eval()
    rows = list(rows)
    # The same number of rows in every process: FSDP's all-gathers in forward run in lockstep.
    mine = rows[: len(rows) - len(rows) % d.world_size][d.rank :: d.world_size]
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, target count
    for start in range(0, len(mine), micro_batch_size):
        input_ids, valid = data.batch(mine[start : start + micro_batch_size])
        input_ids, target_mask = input_ids.to(device), valid[:, 1:].to(device)
        with autocast(device, precision):
            totals[0] += loss_fn(model, input_ids, target_mask).double()
        totals[1] += target_mask.sum()
    distributed.all_reduce_sum(totals, d)
    model.train(was_training)
    return (totals[0] / totals[1]).item()


@contextlib.contextmanager
def _gradient_sync(model: torch.nn.Module, enabled: bool):
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) on all but the last micro-batch."""
    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


def train(model: torch.nn.Module, data: PackedTokens, spec: TrainSpec, work_dir: Path,
          validation: PackedTokens | None = None, loss_fn: LossFn = lm_loss,
          callbacks: Sequence[StepCallback] = (), description: str = "train") -> dict:
    """Train ``model`` in place for ``spec.steps`` optimizer steps, resuming from the newest
    whole checkpoint under ``work_dir/checkpoints``. Returns the final metrics, the history and
    ``model``: the trained model as a plain module to save (under FSDP an unsharded copy on the
    main process, None on the others)."""
    d = distributed.setup(spec.device)
    precision = training_precision(spec.precision, d.device)  # fp8 where it cannot run fails here, before any step
    enable_tf32(d.device)
    checkpoints = Path(work_dir) / CHECKPOINTS_DIR
    model.to(d.device, torch.float32).train()  # float32 master weights, whatever the checkpoint was saved in
    model_class, model_config = type(model), model.config
    if spec.activation_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"train.activation_checkpointing: {type(model).__name__} does not support transformers' "
                             "gradient checkpointing")
        _checkpoint_blocks(model)
    if precision == "fp8":
        _float8(model)
    sharded = d.enabled and spec.parallelism == "fsdp"
    if sharded:
        distributed.shard(model)  # before the optimizer, which must hold the sharded parameters
    optimizer = _optimizer(model, spec)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, spec))
    state = {"step": 0, "tokens_seen": 0, "history": []}

    resumed = find_latest(checkpoints)
    if resumed is not None:
        load_checkpoint(resumed, model, optimizer, scheduler, sharded)
        state = resumed.state
        if d.is_main:
            print(f"resuming {description} from {resumed.path} (step {resumed.step})", file=sys.stderr)

    if spec.batch_size % (d.world_size * spec.micro_batch_size):
        raise ValueError(f"train.batch_size ({spec.batch_size}) must be a multiple of micro_batch_size "
                         f"({spec.micro_batch_size}) x processes ({d.world_size})")
    forward_model = DistributedDataParallel(model) if d.enabled and not sharded else model
    per_process = spec.batch_size // d.world_size
    validation_rows = range(min(len(validation), spec.eval_batches * spec.micro_batch_size)) if validation else ()
    # In a log (Prefect, CI) a redraw is a new line: redraw every 30 s there, twice a second on a terminal.
    progress = tqdm(total=spec.steps, initial=state["step"], desc=description, disable=not d.is_main,
                    dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)

    while state["step"] < spec.steps:
        step = state["step"]
        started = time.perf_counter()
        rows = global_batch(step, spec.batch_size, len(data), spec.seed)
        # Normalize by the global batch's target count, known to every process without talking.
        num_targets = data.target_count(rows)
        my_rows = rows[d.rank * per_process : (d.rank + 1) * per_process]
        step_loss = torch.zeros((), dtype=torch.float64, device=d.device)

        for start in range(0, per_process, spec.micro_batch_size):
            input_ids, valid = data.batch(my_rows[start : start + spec.micro_batch_size])
            input_ids, target_mask = input_ids.to(d.device), valid[:, 1:].to(d.device)
            last_micro = start + spec.micro_batch_size >= per_process
            # DDP and FSDP average gradients over processes: scale by world size to get the global sum / N.
            with _gradient_sync(forward_model, last_micro or not d.enabled):
                with autocast(d.device, precision):
                    loss_sum = loss_fn(forward_model, input_ids, target_mask)
                (loss_sum * (d.world_size / num_targets)).backward()
            step_loss += loss_sum.detach().double()

        loss = distributed.all_reduce_sum(step_loss, d).item() / num_targets
        if not math.isfinite(loss):
            last = find_latest(checkpoints)
            raise TrainingDiverged(
                f"{description}: loss is {loss} at step {step + 1}; stopped before the optimizer step. "
                f"Last good checkpoint: {last.path if last else 'none'}. Try a lower train.lr or more warmup."
            )
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip or float("inf"))
        grad_norm = (grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm).item()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        state["step"] = step + 1
        state["tokens_seen"] += spec.batch_size * data.seq_len
        elapsed = time.perf_counter() - started
        record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": spec.batch_size * data.seq_len / elapsed, "tokens_seen": state["tokens_seen"]}
        if validation is not None and (record["step"] % spec.eval_every == 0 or record["step"] == spec.steps):
            # Always next-token cross entropy, whatever the training loss: comparable across stages.
            record["val_loss"] = evaluate_loss(model, validation, validation_rows, spec.micro_batch_size,
                                               lm_loss, d.device, precision, d)
        state["history"].append(record)
        if d.is_main:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", lr=f"{lr:.2e}", refresh=False)
            for callback in callbacks:
                callback(record)
        if record["step"] % spec.checkpoint_every == 0 or record["step"] == spec.steps:
            # A collective: under FSDP every process writes its own shard.
            save_checkpoint(checkpoints, record["step"], model, optimizer, scheduler, state, spec.keep_checkpoints,
                            sharded)

    progress.close()
    trained = model
    if sharded:  # gathered again rather than kept from the last checkpoint: a whole copy held in RAM
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        trained = None
        if d.is_main:
            trained = model_class(model_config)
            trained.load_state_dict(weights)
    history = state["history"]
    val = [r["val_loss"] for r in history if "val_loss" in r]
    return {"model": trained, "precision": precision, "steps": state["step"], "tokens_seen": state["tokens_seen"],
            "final_loss": history[-1]["loss"] if history else float("nan"),
            "val_loss": val[-1] if val else float("nan"), "history": history}


def save_trained(result: dict, out: Path, tokenizer) -> None:
    """``train``'s result as a checkpoint folder: weights and config (``save_pretrained``) in the
    training dtype (bfloat16 for bf16 and fp8 runs, not the float32 master copy; the config's
    ``dtype`` says which), the tokenizer, and ``measurements/training_history.json`` (the final
    metrics and every step's record)."""
    result["model"].to(weights_dtype(result["precision"])).save_pretrained(out)
    tokenizer.save_pretrained(out)
    metrics = {k: result[k] for k in ("steps", "tokens_seen", "final_loss", "val_loss")}
    atomic_write_text(Path(out) / HISTORY_FILE, json.dumps({"metrics": metrics, "history": result["history"]}))


def read_history(folder: Path) -> dict:
    """A checkpoint folder's training history (``{"metrics", "history"}``); empty when it has none."""
    path = Path(folder) / HISTORY_FILE
    return json.loads(path.read_text()) if path.is_file() else {"metrics": {}, "history": []}
