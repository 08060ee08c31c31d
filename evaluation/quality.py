"""Quality on held-out text: validation loss and perplexity, KL to the teacher, greedy agreement.

Every number is computed on the recipe's validation split (the packed rows the data stage
wrote, model/data.py), through the training loop's own ``evaluate_loss``: the validation
loss here is the same number pretraining logs, and KL and next-token accuracy are the same
loop with another per-token function.

Greedy agreement (the MiniPuzzle ranking signal, docs/compression.md 2.3): the teacher
continues each held-out prompt greedily; ``greedy_agreement`` is the fraction of those
tokens the student also ranks first when fed the teacher's continuation (teacher-forced,
so one early divergence does not decide the rest), and ``greedy_prefix_match`` the mean
fraction of tokens the student's own greedy continuation matches before it first differs.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from model.data import PackedTokens, read_meta
from model.losses import forward_kl
from model.tokenizer import tokenizer_digest
from model.train import evaluate_loss


def check_same_tokenizer(model_dir: Path, data_dir: Path | None = None, teacher_dir: Path | None = None) -> None:
    """Loss, KL and agreement only mean something on the tokens the model was trained with."""
    digest = tokenizer_digest(model_dir)
    if data_dir is not None:
        data_digest = read_meta(data_dir).get("tokenizer_digest")
        if data_digest and data_digest != digest:
            raise ValueError(f"{model_dir} has a different tokenizer from the data in {data_dir} "
                             f"(tokenizer.json sha256 {digest[:12]} vs {data_digest[:12]}); its validation loss "
                             "on these tokens would be meaningless")
    if teacher_dir is not None and tokenizer_digest(teacher_dir) != digest:
        raise ValueError(f"{model_dir} and its teacher {teacher_dir} have different tokenizers; "
                         "KL and agreement need the same vocabulary")


def validation_rows(data: PackedTokens, limit: int | None) -> range:
    return range(len(data) if limit is None else min(limit, len(data)))


def next_token_hits(model: torch.nn.Module, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Number of target positions where the argmax of the logits is the next token."""
    predicted = model(input_ids=input_ids).logits[:, :-1].argmax(-1)  # (B, L-1)
    return ((predicted == input_ids[:, 1:]) * target_mask).sum()


@torch.no_grad()
def greedy_agreement(student: torch.nn.Module, teacher: torch.nn.Module, prompts: torch.Tensor,
                     new_tokens: int, pad_token_id: int) -> dict:
    """Agreement of the student's greedy choices with the teacher's on ``prompts`` (N, P)."""
    student.eval()
    teacher.eval()
    prompt_len = prompts.shape[1]
    ones = torch.ones_like(prompts)
    generate = dict(attention_mask=ones, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, pad_token_id=pad_token_id)
    teacher_seq = teacher.generate(prompts, **generate)  # (N, P + T)
    student_seq = student.generate(prompts, **generate)
    # Teacher-forced: the student's argmax at each position of the teacher's continuation.
    student_next = student(input_ids=teacher_seq[:, :-1]).logits[:, prompt_len - 1 :].argmax(-1)  # (N, T)
    forced = (student_next == teacher_seq[:, prompt_len:]).float().mean().item()
    # Free-running: how far the two greedy continuations agree before they first differ.
    same = (student_seq[:, prompt_len:] == teacher_seq[:, prompt_len:]).int()  # (N, T)
    prefix = same.cumprod(dim=1).sum(dim=1).float() / new_tokens  # (N,)
    return {"greedy_agreement": forced, "greedy_prefix_match": prefix.mean().item()}


def measure_quality(model: torch.nn.Module, data_dir: Path, spec, teacher: torch.nn.Module | None = None,
                    pad_token_id: int = 0, device: torch.device | None = None) -> dict:
    """Validation loss, perplexity and next-token accuracy; with a teacher also KL and agreement.

    ``spec`` is a QualitySpec. ``model`` (and ``teacher``) sit on ``device`` already."""
    device = device or next(model.parameters()).device
    data = PackedTokens(data_dir, "validation")
    rows = validation_rows(data, spec.validation_rows)
    loss = evaluate_loss(model, data, rows, spec.micro_batch_size, device=device)
    out = {
        "val_loss": loss,
        "val_perplexity": math.exp(loss),
        "val_token_accuracy": evaluate_loss(model, data, rows, spec.micro_batch_size, next_token_hits, device=device),
        "val_tokens": data.target_count(rows),
    }
    if teacher is not None:
        out["kl_to_teacher"] = evaluate_loss(model, data, rows, spec.micro_batch_size, forward_kl(teacher), device=device)
        prompt_rows = [int(i) for i in torch.linspace(0, len(data) - 1, spec.generation_prompts).round().unique()]
        input_ids, valid = data.batch(prompt_rows)
        keep = valid[:, : spec.prompt_tokens].all(dim=1)  # the last row may be padding-short
        prompts = input_ids[keep, : spec.prompt_tokens].to(device)
        out |= greedy_agreement(model, teacher, prompts, spec.generation_tokens, pad_token_id)
        out["agreement_prompts"] = int(keep.sum())
    return out
