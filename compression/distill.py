"""Knowledge distillation: retrain a pruned student from its teacher's logits.

The loss per target position (Minitron / Minitron-SSM: logit-only forward KL, T = 1):

    kd(t) = T^2 * KL( softmax(teacher_logits / T) || softmax(student_logits / T) )

The T^2 factor (Hinton et al.) keeps gradient magnitudes comparable across temperatures,
so T = 1 is the plain forward KL. Options: ``top_k`` keeps the teacher's k largest logits
(its distribution renormalized over them, the student's log-probabilities read at the same
ids), ``ce_weight`` adds next-token cross entropy, ``cosine_weight`` adds 1 - cos between a
depth-pruned student's block outputs and those of the teacher blocks they came from.

The teacher is frozen in eval mode and runs on the fly. Training reuses model/train.py: the
same loop, checkpoints, resume, progress bar and DDP; only the loss differs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from compression.specs import DistillSpec
from model import distributed
from model.architectures import get_family, load_pretrained
from model.contract import ArchSummary, DataRef, Lineage, ModelRef, Stage, json_digest, stored_ref
from model.data import PackedTokens
from model.fsutil import atomic_write_text
from model.pretrain import HISTORY_FILE, MODEL_DIR
from model.specs import Section
from model.tokenizer import tokenization_of
from model.train import LossFn, StepCallback, train


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
    record = Path(student_dir) / "pruning.json"
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


DISTILL = Stage("distill", ("compression.distill", "model.train", "model.checkpoint"))


class DistillStageSpec(Section):
    name: str
    distill: DistillSpec


def run_distill(spec: DistillStageSpec, inputs: dict, store, callbacks: tuple[StepCallback, ...] = ()) -> ModelRef:
    """Distill ``inputs['student']`` from ``inputs['teacher']`` on ``inputs['data']``."""
    from compression.stages import model_folder

    student_ref: ModelRef = inputs["student"]
    teacher_ref: ModelRef = inputs["teacher"]
    data_ref: DataRef = inputs["data"]
    key = DISTILL.key(spec, inputs)
    ref_key = f"distill/{spec.name}-{student_ref.digest[:8]}-{key[:8]}"
    if (cached := stored_ref(store, ref_key, ModelRef)) is not None:
        return cached

    student_dir, teacher_dir = model_folder(store, student_ref), model_folder(store, teacher_ref)
    check_compatible(teacher_dir, student_dir)
    work_dir = store.stage_dir("distill", ref_key.split("/", 1)[1])
    launch = {"spec": spec.model_dump(mode="json"), "student_dir": str(student_dir), "teacher_dir": str(teacher_dir),
              "data_dir": str(store.fetch(data_ref.uri)), "work_dir": str(work_dir)}
    if spec.distill.train.num_processes > 1 and not distributed.under_torchrun():
        distributed.launch_workers("compression.distill", launch, spec.distill.train.num_processes, work_dir)
    else:
        _distill_and_save(launch, callbacks)

    out = work_dir / MODEL_DIR
    history = json.loads((out / HISTORY_FILE).read_text())
    uri = store.publish(out, f"{ref_key}/{MODEL_DIR}")
    config = json.loads((out / "config.json").read_text())
    from transformers import AutoConfig

    summary = get_family(config["model_type"]).summarize(AutoConfig.from_pretrained(out))
    ref = ModelRef(uri=uri, digest=store.published_digest(uri), architecture=ArchSummary(**summary),
                   lineage=Lineage(stage="distill", spec_digest=json_digest(spec), code_digest=DISTILL.code(),
                                   parents=[student_ref.digest, teacher_ref.digest, data_ref.digest],
                                   recipe_name=spec.name),
                   metrics=history["metrics"])
    store.write_ref(ref_key, ref)
    return ref


def _distill_and_save(launch: dict, callbacks: tuple[StepCallback, ...] = ()) -> None:
    """Load, distill and save (rank 0) what a launch record describes; runs in every process."""
    spec = DistillStageSpec.model_validate(launch["spec"])
    work_dir, student_dir = Path(launch["work_dir"]), Path(launch["student_dir"])
    student, tokenizer = load_pretrained(student_dir, dtype=torch.float32)
    teacher, _ = load_pretrained(launch["teacher_dir"], dtype=torch.float32)
    result = distill(student, teacher, PackedTokens(launch["data_dir"], "train"), spec.distill, work_dir,
                     validation=PackedTokens(launch["data_dir"], "validation"),
                     layer_map=depth_layer_map(student_dir), callbacks=callbacks, description=f"distill {spec.name}")
    if int(os.environ.get("RANK", "0")) == 0:
        out = work_dir / MODEL_DIR
        result["model"].save_pretrained(out)
        tokenizer.save_pretrained(out)
        if (student_dir / "pruning.json").is_file():
            (out / "pruning.json").write_text((student_dir / "pruning.json").read_text())
        metrics = {k: result[k] for k in ("steps", "tokens_seen", "final_loss", "val_loss")}
        atomic_write_text(out / HISTORY_FILE, json.dumps({"metrics": metrics, "history": result["history"]}))


if __name__ == "__main__":  # a torchrun worker
    _distill_and_save(json.loads(Path(sys.argv[1]).read_text()))
    distributed.teardown(distributed.setup("auto"))
