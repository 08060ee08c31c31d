"""Pruning is exact: each axis equals a simple reference computed on the unpruned model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import NemotronHForCausalLM

from compression.importance import random_scores
from compression.prune import make_plan, prune_model, target_problems
from compression.spec import PruneTarget
from model.nemotron_h import build_config

from .conftest import run_cli

ATOL = 1e-5  # fp32


@pytest.fixture(scope="module")
def net():
    """micro preset with non-trivial norms and biases-free weights: every layer type, 4 Mamba groups."""
    torch.manual_seed(0)
    model = NemotronHForCausalLM(build_config("micro", {"pattern": "M-*M-M*-"})).eval()
    with torch.no_grad():  # move norm weights and dt_bias away from their constant init
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "dt_bias", "D")):
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def input_ids(net):
    return torch.randint(0, net.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_pruning_to_own_sizes_is_the_identity(net, input_ids):
    same = prune_model(net, random_scores(net.config, 0), PruneTarget())
    assert torch.equal(logits(net, input_ids), logits(same, input_ids))


def test_dropping_a_layer_equals_skipping_its_block(net, input_ids):
    pruned = prune_model(net, random_scores(net.config, 0), PruneTarget(drop_layers=[1, 3]))
    assert pruned.config.layers_block_type == [net.config.layers_block_type[i] for i in (0, 2, 4, 5, 6, 7)]
    handles = [net.model.layers[i].register_forward_hook(lambda m, args, out: args[0]) for i in (1, 3)]
    try:
        expected = logits(net, input_ids)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(logits(pruned, input_ids), expected, atol=ATOL, rtol=0)


def _masked_copy(net):
    masked = NemotronHForCausalLM(net.config).eval()
    masked.load_state_dict(net.state_dict())
    return masked


def test_removing_ffn_neurons_equals_zeroing_them(net, input_ids):
    scores = random_scores(net.config, 3)
    target = PruneTarget(intermediate_size=80)
    plan = make_plan(net.config, scores, target)
    masked = _masked_copy(net)
    with torch.no_grad():
        for i, keep in plan.ffn.items():
            drop = torch.ones(net.config.intermediate_size, dtype=torch.bool)
            drop[keep] = False
            masked.model.layers[i].mixer.up_proj.weight[drop] = 0  # relu(0)^2 = 0: the neuron is silent
    torch.testing.assert_close(logits(prune_model(net, scores, target), input_ids), logits(masked, input_ids),
                               atol=ATOL, rtol=0)


def test_removing_query_heads_equals_zeroing_their_o_proj_columns(net, input_ids):
    scores = random_scores(net.config, 4)
    target = PruneTarget(num_attention_heads=2)
    plan = make_plan(net.config, scores, target)
    head_dim = net.config.head_dim
    masked = _masked_copy(net)
    with torch.no_grad():
        for i, keep in plan.attention_heads.items():
            for head in set(range(net.config.num_attention_heads)) - set(keep.tolist()):
                masked.model.layers[i].mixer.o_proj.weight[:, head * head_dim : (head + 1) * head_dim] = 0
    torch.testing.assert_close(logits(prune_model(net, scores, target), input_ids), logits(masked, input_ids),
                               atol=ATOL, rtol=0)


def reference_mamba2(mixer, config, hidden, heads, channels):
    """Mamba-2 by its recurrence (docs/architectures.md 3.1) on the kept heads and channels
    of an unpruned mixer: every head reads B/C of its *original* group, the gated RMSNorm runs
    over each original group's kept channels. hidden: (B, L, hidden) -> (B, L, hidden)."""
    H, P, G, N = config.mamba_num_heads, config.mamba_head_dim, config.n_groups, config.ssm_state_size
    d = H * P
    batch, length, _ = hidden.shape
    idx = (heads[:, None] * P + channels[None, :]).flatten()
    proj = hidden @ mixer.in_proj.weight.T  # (B, L, 2d + 2GN + H)
    z, x = proj[..., idx], proj[..., d + idx]
    bc = proj[..., 2 * d : 2 * d + 2 * G * N]
    dt = proj[..., 2 * d + 2 * G * N + heads]
    # causal depthwise conv over x | B | C, then SiLU
    conv_idx = torch.cat([idx, torch.arange(d, d + 2 * G * N)])
    xbc = torch.cat([x, bc], -1).transpose(1, 2)  # (B, C, L)
    w, b = mixer.conv1d.weight[conv_idx], mixer.conv1d.bias[conv_idx]
    xbc = F.silu(F.conv1d(F.pad(xbc, (w.shape[-1] - 1, 0)), w, b, groups=len(conv_idx))).transpose(1, 2)
    x = xbc[..., : len(idx)].unflatten(-1, (len(heads), len(channels)))  # (B, L, H', P')
    B_, C_ = xbc[..., len(idx) :].split(G * N, dim=-1)
    group = heads // (H // G)  # original group of every kept head
    B_h = B_.unflatten(-1, (G, N))[:, :, group]  # (B, L, H', N)
    C_h = C_.unflatten(-1, (G, N))[:, :, group]
    dt = F.softplus(dt + mixer.dt_bias[heads]).clamp(min=config.time_step_min)  # (B, L, H')
    A = -torch.exp(mixer.A_log[heads].float())
    state = torch.zeros(batch, len(heads), len(channels), N)
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = state * decay + (dt[:, t, :, None] * x[:, t])[..., None] * B_h[:, t, :, None, :]
        ys.append((state * C_h[:, t, :, None, :]).sum(-1) + mixer.D[heads][:, None] * x[:, t])
    y = torch.stack(ys, 1).flatten(-2)  # (B, L, H'P')
    y = y * F.silu(z)
    out = torch.empty_like(y)
    channel_group = group.repeat_interleave(len(channels))
    for g in range(G):
        cols = channel_group == g
        part = y[..., cols]
        out[..., cols] = part * torch.rsqrt(part.pow(2).mean(-1, keepdim=True) + mixer.norm.variance_epsilon)
    out = out * mixer.norm.weight[idx]
    return out @ mixer.out_proj.weight[:, idx].T


def test_reference_mamba2_matches_the_unpruned_mixer(net):
    hidden = torch.randn(2, 37, net.config.hidden_size, generator=torch.Generator().manual_seed(2))
    mixer = net.model.layers[0].mixer
    everything = torch.arange(net.config.mamba_num_heads), torch.arange(net.config.mamba_head_dim)
    with torch.no_grad():
        torch.testing.assert_close(mixer(hidden), reference_mamba2(mixer, net.config, hidden, *everything),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("target", [PruneTarget(mamba_num_heads=4), PruneTarget(mamba_num_heads=4, mamba_head_dim=5),
                                    PruneTarget(mamba_head_dim=3)], ids=["heads", "heads+channels", "channels"])
def test_removing_mamba_heads_equals_the_reference_on_the_kept_heads(net, target):
    scores = random_scores(net.config, 5)
    plan = make_plan(net.config, scores, target)
    pruned = prune_model(net, scores, target)
    hidden = torch.randn(2, 37, net.config.hidden_size, generator=torch.Generator().manual_seed(3))
    for new_i, i in enumerate(plan.layers):
        if i not in plan.mamba_heads:
            continue
        with torch.no_grad():
            got = pruned.model.layers[new_i].mixer(hidden)
            want = reference_mamba2(net.model.layers[i].mixer, net.config, hidden, plan.mamba_heads[i],
                                    plan.mamba_channels[i])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_group_aware_selection_keeps_every_head_in_its_group(net):
    config = net.config  # 8 heads in 4 groups of 2; A_log = log(1..H) identifies each head
    scores = random_scores(config, 0)
    for i in scores:
        if i.startswith("mamba."):  # make group 0's heads the best everywhere: a global ranking would take them all
            scores[i][:2] += 10
    aware = prune_model(net, scores, PruneTarget(mamba_num_heads=4))
    naive = prune_model(net, scores, PruneTarget(mamba_num_heads=4, mamba_head_selection="global"))
    heads_per_group_before, heads_per_group_after = 2, 1
    for model, should_hold in ((aware, True), (naive, False)):
        holds = True
        for block in model.model.layers:
            if block.block_type != "linear_attention":
                continue
            original = torch.exp(block.mixer.A_log.detach()).round().long() - 1  # original head index
            new_group = torch.arange(len(original)) // heads_per_group_after
            holds &= bool((original // heads_per_group_before == new_group).all())
            if should_hold:
                assert torch.bincount(original // heads_per_group_before, minlength=4).tolist() == [1, 1, 1, 1]
        assert holds == should_hold


BAD_TARGETS = [
    ({"mamba_num_heads": 6}, "target.mamba_num_heads", "multiple of n_groups"),
    ({"num_attention_heads": 3}, "target.num_attention_heads", "multiple of num_key_value_heads"),
    ({"hidden_size": 65}, "target.hidden_size", "larger than"),
    ({"num_layers": 0}, "target.num_layers", "greater than 0"),
    ({"drop_layers": [0, 1, 2, 3, 4, 5, 6, 7]}, "target.drop_layers", "every layer"),
    ({"drop_layers": [12]}, "target.drop_layers", "do not exist"),
    ({"mamba_heads": 4}, "target.mamba_heads", "unknown field"),
]


@pytest.mark.parametrize("target, field, message", BAD_TARGETS, ids=[f for _, f, _ in BAD_TARGETS])
def test_bad_targets_are_rejected_before_any_work(net, tmp_path, monkeypatch, capsys, target, field, message):
    net.save_pretrained(tmp_path / "teacher")
    monkeypatch.setenv("FACTORY_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    code, _, err = run_cli("prune", str(tmp_path / "teacher"), str(tmp_path / "out"), "--target", json.dumps(target),
                           capsys=capsys)
    assert code == 2, err
    assert field in err and message in err, err
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "out").exists()  # nothing was computed


def test_a_model_that_is_not_nemotron_h_is_rejected(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=100)).save_pretrained(tmp_path / "llama")
    assert "model" in target_problems(LlamaConfig(), PruneTarget())
    code, _, err = run_cli("prune", str(tmp_path / "llama"), str(tmp_path / "out"), "--target", "{}", capsys=capsys)
    assert code == 2 and "not a Nemotron-H model" in err


@pytest.mark.slow  # a fresh loader process
def test_pruned_folder_loads_in_a_fresh_process_and_generates(net, tmp_path):
    from compression.prune import prune_checkpoint
    from model.tokenizer import train_bpe

    teacher = tmp_path / "teacher"
    net.save_pretrained(teacher)
    train_bpe(["def f(x):\n    return x\n" * 50], vocab_size=net.config.vocab_size).save_pretrained(teacher)
    summary = prune_checkpoint(teacher, tmp_path / "student", random_scores(net.config, 0),
                               PruneTarget(hidden_size=48, mamba_num_heads=4, drop_layers=[7]), {})
    assert summary["layer_pattern"] == "M-*M-M*"
    script = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = t('def f', return_tensors='pt').input_ids\n"
        "out = m.generate(ids, max_new_tokens=5, do_sample=False)\n"
        "assert out.shape[1] == ids.shape[1] + 5 and m.config.hidden_size == 48 and m.config.mamba_num_heads == 4\n"
        "assert not any(k in sys.modules for k in ('compression', 'model', 'flows'))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "student")], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
