"""Token losses computed a sequence chunk at a time, so no (batch, sequence, vocabulary) tensor exists.

A language model's logits are (B, L, V): at 4 x 8,192 x 131,072 one float32 copy is 16 GiB,
and a loss keeps several alive (logits, log-softmax, their gradients; a teacher's too in
distillation). Here instead

    run the model with logits_to_keep=1          the head projects one position, not L
    read its final hidden states (B, L, H)       a forward hook on the decoder (``model.model``)
    for each chunk of ``chunk_tokens`` positions:
        logits = hidden[chunk] @ head.T          (chunk, V), in float32
        loss  += sum(mask * per_token(logits))   under activation checkpointing

Checkpointing each chunk means backward recomputes its logits instead of keeping them, so
peak memory is O(chunk_tokens x V) whatever B x L is. The value and the gradient equal the
unchunked loss's (tests/test_losses.py); ``bench/loss_memory.py`` measures the peak.

The hook reads the decoder's output inside the model's own forward and the head weight is
used after it, which is what DDP and FSDP2 expect: FSDP2 keeps the root's parameters
(embeddings, final norm, head) gathered from forward until backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_TOKENS = 2048  # x 131,072 vocabulary x 4 bytes = 1 GiB of float32 logits per chunk


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place and needs none)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def final_hidden(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.nn.Linear]:
    """``model``'s final hidden states (B, L, H), after its last norm, and its output head, from one
    forward that projects a single position through the head instead of all L."""
    inner = unwrap(model)
    decoder, head = getattr(inner, "model", None), inner.get_output_embeddings()
    if decoder is None or not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{type(inner).__name__} has no `model` decoder and linear output head to read hidden "
                        "states from")
    captured = {}

    def keep(module, args, output):
        captured["hidden"] = output[0]  # last_hidden_state, a ModelOutput's first field

    handle = decoder.register_forward_hook(keep)
    try:
        model(input_ids=input_ids, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    return captured["hidden"], head


def project(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits (n, V) of hidden states (n, H), computed like the model's own head (under
    autocast the matmul runs in bfloat16, as in the model's forward)."""
    return F.linear(hidden, head.weight, head.bias).float()


def chunked_token_sum(per_token: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor], mask: torch.Tensor,
                      chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """``sum_i mask[i] * per_token(*[t[i] for t in tensors])`` over N positions, ``chunk_tokens`` at a time.

    ``tensors`` are (N, ...) per-position inputs (hidden states, targets), ``mask`` (N,) weights
    them, ``per_token`` maps a chunk of each to (n,) losses and may capture weights in a closure:
    non-reentrant checkpointing recomputes it in backward and still routes gradients to them."""
    total = torch.zeros((), dtype=torch.float32, device=mask.device)
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    for start in range(0, mask.shape[0], chunk_tokens):
        chunk = [t[start : start + chunk_tokens] for t in tensors]
        weights = mask[start : start + chunk_tokens].float()
        if recompute:
            total = total + checkpoint(_masked_sum, per_token, weights, *chunk, use_reentrant=False)
        else:
            total = total + _masked_sum(per_token, weights, *chunk)
    return total


def _masked_sum(per_token, weights: torch.Tensor, *chunk: torch.Tensor) -> torch.Tensor:
    return (per_token(*chunk) * weights).sum()


def kd_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                 top_k: int | None = None, renormalize_student: bool = False) -> torch.Tensor:
    """T^2 * KL(p_teacher || p_student) per position: (..., V) logits -> (...).

    ``top_k``: the teacher's k largest logits, renormalized; the student's log-probabilities at those
    ids come from its full distribution, or with ``renormalize_student`` from one over the k ids."""
    t = teacher_logits.float() / temperature
    s = student_logits.float() / temperature
    if top_k is not None:
        t, ids = t.topk(top_k, dim=-1)
        if renormalize_student:
            log_p_student = F.log_softmax(s.gather(-1, ids), dim=-1)  # over the k ids only
        else:
            log_p_student = F.log_softmax(s, dim=-1).gather(-1, ids)  # over the whole vocabulary
    else:
        log_p_student = F.log_softmax(s, dim=-1)
    log_p_teacher = F.log_softmax(t, dim=-1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1) * temperature**2


def lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, target_mask: torch.Tensor,
            chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Next-token cross entropy summed over the target positions that are real tokens.

    input_ids (B, L), target_mask (B, L-1): position t predicts token t+1."""
    hidden, head = final_hidden(model, input_ids)  # (B, L, H)

    def cross_entropy(hidden_chunk, targets):  # (n, H), (n,) -> (n,)
        return F.cross_entropy(project(head, hidden_chunk), targets, reduction="none")

    return chunked_token_sum(cross_entropy, [hidden[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten()],
                             target_mask.flatten(), chunk_tokens)


def teacher_student_sum(student: torch.nn.Module, teacher: torch.nn.Module, input_ids: torch.Tensor,
                        target_mask: torch.Tensor, per_token: Callable[..., torch.Tensor],
                        chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Sum over the target positions of ``per_token(student_logits, teacher_logits, targets)`` ((n, V),
    (n, V) float32 and (n,) -> (n,)), one forward of each model, a chunk of positions at a time. No
    gradient reaches the teacher."""
    with torch.no_grad():
        teacher_hidden, teacher_head = final_hidden(teacher, input_ids)  # (B, L, H_teacher)
    student_hidden, student_head = final_hidden(student, input_ids)  # (B, L, H_student)

    def chunk(s_hidden, t_hidden, targets):  # (n, H_s), (n, H_t), (n,) -> (n,)
        with torch.no_grad():
            teacher_logits = project(teacher_head, t_hidden)
        return per_token(project(student_head, s_hidden), teacher_logits, targets)

    return chunked_token_sum(chunk, [student_hidden[:, :-1].flatten(0, 1), teacher_hidden[:, :-1].flatten(0, 1),
                                     input_ids[:, 1:].flatten()], target_mask.flatten(), chunk_tokens)


def forward_kl(teacher: torch.nn.Module, chunk_tokens: int = CHUNK_TOKENS):
    """A loss function (model, input_ids, target_mask) -> sum over targets of KL(teacher || model)
    at temperature 1, the distillation objective, for measuring a student (no gradient to the teacher)."""
    teacher.eval()

    def kl(student_logits, teacher_logits, targets):  # (n, V), (n, V), (n,) -> (n,)
        return kd_per_token(student_logits, teacher_logits)

    def kl_sum(student: torch.nn.Module, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        return teacher_student_sum(student, teacher, input_ids, target_mask, kl, chunk_tokens)

    return kl_sum
