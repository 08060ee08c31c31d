"""Knowledge distillation: retrain a pruned student from its teacher's logits.

The loss per target position (Minitron / Minitron-SSM: logit-only forward KL, T = 1):

    kd(t) = T^2 * KL( softmax(teacher_logits / T) || softmax(student_logits / T) )

The T^2 factor (Hinton et al.) keeps gradient magnitudes comparable across temperatures,
so T = 1 is the plain forward KL. Options: ``top_k`` keeps the teacher's k largest logits
(its distribution renormalized over them; the student's log-probabilities read at the same
ids from its full distribution, or, with ``top_k_student: renormalized``, renormalized over
those k ids too), ``ce_weight`` adds next-token cross entropy, ``cosine_weight`` adds 1 - cos
between a depth-pruned student's block outputs and those of the teacher blocks they came
from (compared on the hidden channels the student kept, when its hidden size was pruned).

Neither model's (B, L, V) logits ever exist: both run to their final hidden states and the
loss projects them through each head a chunk of positions at a time (``model/losses.py``).

The teacher is frozen in eval mode, in the inference dtype (bfloat16 on CUDA), and runs on
the fly. Training reuses model/train.py: the same loop, checkpoints, resume, progress bar and
DDP/FSDP; only the loss differs. The stage around it (fetching, launching, publishing) is
``compression/distill_stage.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from compression.prune import PRUNING_FILE
from compression.spec import DistillSpec
from model import distributed
from model.contract import StepCallback
from model.data import PackedTokens
from model.device import inference_dtype
from model.losses import CHUNK_TOKENS, kd_per_token, teacher_student_sum, unwrap
from model.tokenizer import tokenization_of
from model.train import LossFn, train


@dataclass(frozen=True)
class BlockAlignment:
    """Which teacher block each student block came from, and which teacher hidden channels the
    student kept (None: all of them), from a pruned student's pruning.json."""

    layers: dict[int, int]  # student layer -> teacher layer
    hidden_channels: list[int] | None = None


def _block_outputs(net, layers: list[int]):
    """Collect the outputs of ``layers`` on the next forward: returns (outputs dict, hook handles)."""
    outputs, handles = {}, []
    for i in layers:
        def hook(module, args, output, i=i):
            outputs[i] = output
        handles.append(net.model.layers[i].register_forward_hook(hook))
    return outputs, handles


def make_kd_loss(teacher: torch.nn.Module, spec: DistillSpec, alignment: BlockAlignment | None = None,
                 chunk_tokens: int = CHUNK_TOKENS) -> LossFn:
    """A LossFn for model/train.py: the summed distillation loss over the target positions.

    ``alignment`` pairs student and teacher blocks for the cosine term; the logits are computed
    ``chunk_tokens`` positions at a time."""
    teacher.eval().requires_grad_(False)
    if spec.cosine_weight and not (alignment and alignment.layers):
        raise ValueError("distill.cosine_weight needs a depth-pruned student (pruning.json with kept_layers)")
    cosine_layers = alignment.layers if spec.cosine_weight else {}
    channels = alignment.hidden_channels if cosine_layers else None
    renormalize = spec.top_k_student == "renormalized"

    def per_token(student_logits, teacher_logits, targets):  # (n, V), (n, V), (n,) -> (n,)
        value = kd_per_token(student_logits, teacher_logits, spec.temperature, spec.top_k, renormalize)
        if spec.ce_weight:
            value = value + spec.ce_weight * F.cross_entropy(student_logits, targets, reduction="none")
        return value

    def loss(student, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        t_out, t_handles = _block_outputs(teacher, list(cosine_layers.values()))
        s_out, s_handles = _block_outputs(unwrap(student), list(cosine_layers))
        try:
            total = teacher_student_sum(student, teacher, input_ids, target_mask, per_token, chunk_tokens)
        finally:
            for handle in t_handles + s_handles:
                handle.remove()
        length = input_ids.shape[1]  # block outputs of a Hymba lead with its meta tokens: read the last L
        for j, i in cosine_layers.items():
            teacher_block = t_out[i][:, -length:-1] if channels is None else t_out[i][:, -length:-1, channels]
            cos = F.cosine_similarity(s_out[j][:, -length:-1].float(), teacher_block.float(), dim=-1)  # (B, L-1)
            total = total + spec.cosine_weight / len(cosine_layers) * ((1 - cos) * target_mask).sum()
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


def block_alignment(student_dir: Path) -> BlockAlignment | None:
    """The student's blocks and hidden channels as cut from the teacher, from its pruning.json
    (None for a student that was not pruned by the factory)."""
    record = Path(student_dir) / PRUNING_FILE
    if not record.is_file():
        return None
    pruning = json.loads(record.read_text())
    return BlockAlignment(dict(enumerate(pruning.get("kept_layers", []))), pruning.get("kept_hidden_channels"))


def distill(student, teacher, data: PackedTokens, spec: DistillSpec, work_dir: Path,
            validation: PackedTokens | None = None, alignment: BlockAlignment | None = None,
            callbacks: tuple[StepCallback, ...] = (), description: str = "distill") -> dict:
    """Train ``student`` in place from ``teacher``; resumes from ``work_dir/checkpoints``."""
    d = distributed.setup(spec.train.device)
    teacher.to(d.device, inference_dtype(d.device))  # frozen: no float32 master copy needed
    if d.enabled and spec.train.parallelism == "fsdp":
        distributed.shard(teacher)  # frozen, but its weights are as large as the student's: shard them too
    loss_fn = make_kd_loss(teacher, spec, alignment)
    return train(student, data, spec.train, work_dir, validation=validation, loss_fn=loss_fn,
                 callbacks=callbacks, description=description)
