"""Chunked losses against the full-logit formulas: the same value and the same gradient, whatever
the chunk size; and the precision policy (float32 master weights, bf16 checkpoints, fp8 refused
where it cannot run)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, NemotronHForCausalLM

from compression.distill import BlockAlignment, kd_per_token, make_kd_loss
from compression.importance import random_scores
from compression.prune import prune
from compression.spec import DistillSpec, PruneTarget
from model import losses
from model.device import training_precision
from model.nemotron_h import build_config
from model.spec import TrainSpec
from model.train import _checkpoint_blocks, save_trained, train

VOCAB = 512


def _model(seed: int, **overrides):
    torch.manual_seed(seed)
    return NemotronHForCausalLM(build_config("micro", {"vocab_size": VOCAB} | overrides))


def _batch(seed: int = 0):
    ids = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[2, 9:] = False  # a padded tail
    return ids, mask


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(a: dict, b: dict):
    """Equal up to float32 summation order: within 1e-5 of each gradient's largest entry."""
    assert a.keys() == b.keys() and a
    for name in a:
        scale = a[name].abs().max().item()
        assert (a[name] - b[name]).abs().max().item() <= 1e-5 * scale + 1e-12, name


@pytest.mark.parametrize("chunk_tokens", [1, 7, 4096])
def test_chunked_cross_entropy_equals_the_full_logit_loss_in_value_and_gradient(chunk_tokens):
    model, (ids, mask) = _model(0), _batch()
    full_logits = model(input_ids=ids).logits[:, :-1]  # (B, L-1, V): what chunking avoids
    reference = (F.cross_entropy(full_logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
                 * mask.flatten()).sum()
    reference.backward()
    expected = _grads(model)
    model.zero_grad()

    got = losses.lm_loss(model, ids, mask, chunk_tokens=chunk_tokens)
    got.backward()
    torch.testing.assert_close(got, reference)
    _assert_same_grads(_grads(model), expected)


@pytest.mark.parametrize("options", [{}, {"ce_weight": 0.5, "temperature": 2.0}, {"top_k": 5},
                                     {"top_k": 5, "top_k_student": "renormalized"}])
def test_chunked_distillation_equals_the_full_logit_loss_in_value_and_gradient(options):
    teacher, student, (ids, mask) = _model(1), _model(2), _batch(1)
    spec = DistillSpec(**options)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids).logits[:, :-1]
    student_logits = student(input_ids=ids).logits[:, :-1]
    reference = (kd_per_token(student_logits, teacher_logits, spec.temperature, spec.top_k,
                              spec.top_k_student == "renormalized") * mask).sum()
    if spec.ce_weight:
        ce = F.cross_entropy(student_logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        reference = reference + spec.ce_weight * (ce * mask.flatten()).sum()
    reference.backward()
    expected = _grads(student)
    student.zero_grad()

    got = make_kd_loss(teacher, spec, chunk_tokens=5)(student, ids, mask)  # several chunks, the last short
    got.backward()
    torch.testing.assert_close(got, reference)
    _assert_same_grads(_grads(student), expected)
    assert not _grads(teacher)  # the teacher stays frozen


def test_renormalized_top_k_compares_both_distributions_over_the_teachers_top_ids():
    generator = torch.Generator().manual_seed(3)
    student_logits, teacher_logits = torch.randn(4, 50, generator=generator), torch.randn(4, 50, generator=generator)
    values, ids = teacher_logits.topk(6, -1)
    p = torch.softmax(values, -1)
    q = torch.softmax(student_logits.gather(-1, ids), -1)
    torch.testing.assert_close(kd_per_token(student_logits, teacher_logits, top_k=6, renormalize_student=True),
                               (p * (p.log() - q.log())).sum(-1))
    # A student that matches the teacher's top-k logits up to a shift costs nothing, whatever its mass elsewhere.
    shifted = torch.full_like(teacher_logits, 30.0).scatter(-1, ids, values - 2.0)
    assert kd_per_token(shifted, teacher_logits, top_k=6, renormalize_student=True).abs().max() < 1e-5


def test_cosine_term_reads_the_kept_channels_when_the_hidden_size_was_pruned():
    """Before: 1 - cos between a 48-wide student block and a 64-wide teacher block raised a shape error."""
    teacher = _model(4)
    scores = random_scores(teacher.config, seed=0)
    target = PruneTarget(hidden_size=48, drop_layers=[1])
    student, plan = prune(teacher, scores, target)
    alignment = BlockAlignment(dict(enumerate(plan.layers)), plan.hidden.tolist())
    ids, mask = _batch(2)

    def block_outputs(net, layers):
        out = {}
        handles = [net.model.layers[i].register_forward_hook(lambda m, a, o, i=i: out.__setitem__(i, o))
                   for i in layers]
        with torch.no_grad():
            net(input_ids=ids)
        for handle in handles:
            handle.remove()
        return out

    kd_only = make_kd_loss(teacher, DistillSpec())(student, ids, mask)
    with_cosine = make_kd_loss(teacher, DistillSpec(cosine_weight=2.0), alignment)(student, ids, mask)
    s_out, t_out = block_outputs(student, alignment.layers), block_outputs(teacher, alignment.layers.values())
    cosine = sum(((1 - F.cosine_similarity(s_out[j][:, :-1], t_out[i][:, :-1, plan.hidden], dim=-1)) * mask).sum()
                 for j, i in alignment.layers.items())
    torch.testing.assert_close(with_cosine - kd_only, 2.0 / len(alignment.layers) * cosine, rtol=1e-4, atol=1e-4)


def test_bf16_training_keeps_float32_master_weights_and_saves_a_bf16_checkpoint(micro_data, tmp_path):
    from model.data import PackedTokens
    from model.tokenizer import load_tokenizer

    net = _model(5, vocab_size=len(load_tokenizer(micro_data.tokenizer_uri)))
    spec = TrainSpec(steps=2, batch_size=4, micro_batch_size=4, warmup_steps=0, device="cpu", precision="bf16",
                     checkpoint_every=2)
    result = train(net, PackedTokens(micro_data.uri, "train"), spec, tmp_path / "work")
    assert result["precision"] == "bf16"
    assert {p.dtype for p in net.parameters()} == {torch.float32}  # the master copy the optimizer updates
    save_trained(result, tmp_path / "model", load_tokenizer(micro_data.tokenizer_uri))
    assert json.loads((tmp_path / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype="auto")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    # Half the bytes of the float32 weights it was trained as.
    assert (tmp_path / "model" / "model.safetensors").stat().st_size < 0.6 * sum(
        p.numel() * 4 for p in net.parameters())


def test_fp8_is_refused_before_any_work_where_it_cannot_run(micro_data, tmp_path):
    with pytest.raises(ValueError, match="precision.*'fp8' needs a CUDA GPU"):
        TrainSpec(device="cpu", precision="fp8")
    with pytest.raises(ValueError, match="train.precision is 'fp8' but this stage trains on the CPU"):
        training_precision("fp8", torch.device("cpu"))
    from model.data import PackedTokens

    with pytest.raises(ValueError, match="fp8"):
        train(_model(6), PackedTokens(micro_data.uri, "train"), TrainSpec(steps=1, precision="fp8"), tmp_path)
    assert not (tmp_path / "checkpoints").exists()
    assert training_precision("auto", torch.device("cpu")) == "fp32"


def test_activation_checkpointing_recomputes_blocks_to_the_same_gradients(micro_data, tmp_path):
    from model.data import PackedTokens

    model, (ids, mask) = _model(7), _batch(3)
    model.train()
    losses.lm_loss(model, ids, mask).backward()
    expected = _grads(model)
    model.zero_grad()
    _checkpoint_blocks(model)
    losses.lm_loss(model, ids, mask).backward()
    _assert_same_grads(_grads(model), expected)

    from model.hymba import HymbaForCausalLM
    from model.hymba import build_config as hymba_config

    hymba = HymbaForCausalLM(hymba_config("micro", {"vocab_size": VOCAB}))
    with pytest.raises(ValueError, match="activation_checkpointing: HymbaForCausalLM does not support"):
        train(hymba, PackedTokens(micro_data.uri, "train"),
              TrainSpec(steps=1, batch_size=4, micro_batch_size=4, activation_checkpointing=True), tmp_path)
    assert not (tmp_path / "checkpoints").exists()
