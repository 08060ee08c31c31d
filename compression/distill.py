"""Knowledge distillation: retrain a pruned student from its teacher's logits.

The loss per target position (Minitron / Minitron-SSM: logit-only forward KL, T = 1):

    kd(t) = T^2 * KL( softmax(teacher_logits / T) || softmax(student_logits / T) )

The T^2 factor (Hinton et al.) keeps gradient magnitudes comparable across temperatures,
so T = 1 is the plain forward KL. Options: ``top_k`` keeps the teacher's k largest logits
(its distribution renormalized over them, the student's log-probabilities read at the same
ids), ``ce_weight`` adds next-token cross entropy, ``cosine_weight`` adds 1 - cos between a
depth-pruned student's block outputs and those of the teacher blocks they came from.

The teacher is frozen in eval mode and runs on the fly. Training reuses model/train.py: the
same loop, checkpoints, resume, progress bar and DDP; only the loss differs. The stage around
it (fetching, launching, publishing) is ``compression/distill_stage.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from compression.prune import PRUNING_FILE
from compression.spec import DistillSpec
from model import distributed
from model.contract import StepCallback
from model.data import PackedTokens
from model.tokenizer import tokenization_of
from model.train import LossFn, train


def kd_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                 top_k: int | None = None) -> torch.Tensor:
    """T^2 * KL(p_teacher || p_student) per position: (..., V) logits -> (...)."""
    t = teacher_logits.float() / temperature
    s = student_logits.float() / temperature
    if top_k is not None:
        t, ids = t.topk(top_k, dim=-1)
        log_p_student = F.log_softmax(s, dim=-1).gather(-1, ids)
    else:
        log_p_student = F.log_softmax(s, dim=-1)
    log_p_teacher = F.log_softmax(t, dim=-1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1) * temperature**2


def _block_outputs(net, layers: list[int]):
    """Collect the outputs of ``layers`` on the next forward: returns (outputs dict, hook handles)."""
    outputs, handles = {}, []
    for i in layers:
        def hook(module, args, output, i=i):
            outputs[i] = output
        handles.append(net.model.layers[i].register_forward_hook(hook))
    return outputs, handles


def make_kd_loss(teacher: torch.nn.Module, spec: DistillSpec, layer_map: dict[int, int] | None = None) -> LossFn:
    """A LossFn for model/train.py: the summed distillation loss over the target positions.

    ``layer_map`` maps student layer -> teacher layer for the cosine term."""
    teacher.eval().requires_grad_(False)
    layer_map = layer_map or {}
    if spec.cosine_weight and not layer_map:
        raise ValueError("distill.cosine_weight needs a depth-pruned student (pruning.json with kept_layers)")

    def loss(student, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        inner = student.module if hasattr(student, "module") else student  # unwrap DDP for hooks
        cos_terms = spec.cosine_weight and layer_map
        t_out, t_handles = _block_outputs(teacher, list(layer_map.values()) if cos_terms else [])
        s_out, s_handles = _block_outputs(inner, list(layer_map) if cos_terms else [])
        try:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=input_ids).logits[:, :-1]
            student_logits = student(input_ids=input_ids).logits[:, :-1]  # (B, L-1, V)
        finally:
            for handle in t_handles + s_handles:
                handle.remove()
        mask = target_mask.to(student_logits.dtype)  # (B, L-1)
        total = (kd_per_token(student_logits, teacher_logits, spec.temperature, spec.top_k) * mask).sum()
        if spec.ce_weight:
            ce = F.cross_entropy(student_logits.flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="none")
            total = total + spec.ce_weight * (ce * mask.flatten()).sum()
        if cos_terms:
            for j, i in layer_map.items():
                cos = F.cosine_similarity(s_out[j][:, :-1].float(), t_out[i][:, :-1].float(), dim=-1)  # (B, L-1)
                total = total + spec.cosine_weight / len(layer_map) * ((1 - cos) * mask).sum()
        return total

    return loss


def check_compatible(teacher_dir: Path, student_dir: Path) -> None:
    """Same tokenizer (and so the same vocabulary), or a clear error before any work."""
    from transformers import AutoConfig

    teacher_vocab = AutoConfig.from_pretrained(teacher_dir).vocab_size
    student_vocab = AutoConfig.from_pretrained(student_dir).vocab_size
    if teacher_vocab != student_vocab:
        raise ValueError(f"teacher ({teacher_dir}) has a vocabulary of {teacher_vocab} tokens and the student "
                         f"({student_dir}) {student_vocab}: distillation compares logits, so they must share a tokenizer")
    if tokenization_of(teacher_dir) != tokenization_of(student_dir):
        raise ValueError(f"teacher and student tokenizers differ ({teacher_dir}/tokenizer.json vs "
                         f"{student_dir}/tokenizer.json): distillation needs the same token ids")


def depth_layer_map(student_dir: Path) -> dict[int, int]:
    """Student layer -> the teacher layer it was cut from, from the student's pruning.json."""
    record = Path(student_dir) / PRUNING_FILE
    if not record.is_file():
        return {}
    kept = json.loads(record.read_text()).get("kept_layers", [])
    return dict(enumerate(kept))


def distill(student, teacher, data: PackedTokens, spec: DistillSpec, work_dir: Path,
            validation: PackedTokens | None = None, layer_map: dict[int, int] | None = None,
            callbacks: tuple[StepCallback, ...] = (), description: str = "distill") -> dict:
    """Train ``student`` in place from ``teacher``; resumes from ``work_dir/checkpoints``."""
    d = distributed.setup(spec.train.device)
    teacher.to(d.device)
    if d.enabled and spec.train.parallelism == "fsdp":
        distributed.shard(teacher)  # frozen, but its weights are as large as the student's: shard them too
    loss_fn = make_kd_loss(teacher, spec, layer_map if spec.cosine_weight else None)
    return train(student, data, spec.train, work_dir, validation=validation, loss_fn=loss_fn,
                 callbacks=callbacks, description=description)
