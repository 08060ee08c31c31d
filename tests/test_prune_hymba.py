"""Hymba pruning is exact: each axis equals a reference computed on the unpruned model.

The reference is the unpruned model with the pruned elements zeroed (FFN neurons, hidden
channels, out_proj columns and the SSM inputs under them) and, where a norm spans a pruned
axis, that norm taken over the kept channels only: hooks on the unpruned model, independent of
the slicing code. Depth pruning equals skipping the dropped layers' residual updates, KV
producers included. Every test runs on both SSM layouts: Mamba-2 heads (the factory's) and
the release's Mamba-1 channels (``ssm_type: mamba1``, the release's parameter names).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compression.hymba import mixer_shape
from compression.importance import calibration_rows, estimate_importance, layer_kl_scores, random_scores
from compression.prune import (
    check_compressible,
    make_plan,
    prune,
    prune_model,
    score_problems,
    target_problems,
)
from compression.spec import ImportanceSpec, PruneTarget
from model.data import PackedTokens
from model.hymba import HymbaForCausalLM, build_config, config_problems

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 1e-5  # fp32

# micro with 8 layers GWwGWwwG (globals 0, 3, 7; KV pair (1, 2) and triple (4, 5, 6)) and value heads twice
# the SSM head width: 4 query heads of v 32 over 8 SSM heads of 16 (r = 2 SSM heads per attention head),
# 2 KV groups of 2 query heads, 2 SSM groups of 4 heads (the same columns as the KV groups).
OVERRIDES = {"num_hidden_layers": 8, "global_attn_layers": [0, 3, 7], "v_head_dim": 32, "mamba_num_heads": 8,
             "initializer_range": 0.1}


LAYOUTS = ["mamba2", "mamba1"]


def _model(overrides: dict, seed: int = 0) -> HymbaForCausalLM:
    torch.manual_seed(seed)
    model = HymbaForCausalLM(build_config("micro", overrides)).eval()
    with torch.no_grad():  # move norm weights and per-head scalars away from their constant init
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", "dt_bias", "D", "D.0", "conv1d.bias", "dt_proj.0.bias")):
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=LAYOUTS)
def layout(request):
    return request.param


@pytest.fixture(scope="module")
def net(layout):
    model = _model(OVERRIDES | {"ssm_type": layout})
    assert model.config.layer_pattern == "GWwGWwwG" and model.config.kv_reuse_groups == [[1, 2], [4, 5, 6]]
    return model


@pytest.fixture(scope="module")
def input_ids():
    # 21 positions: past the window (8) and the scan chunk (16)
    return torch.randint(0, 512, (2, 21), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


class Parts:
    """A layer's modules under either layout's names."""

    def __init__(self, block):
        self.mamba1 = hasattr(block, "mamba")
        self.mixer = block.mamba if self.mamba1 else block.mixer
        self.mlp = block.moe.experts[0] if self.mamba1 else block.mlp
        self.mlp_norm = block.pre_moe_layernorm if self.mamba1 else block.pre_mlp_layernorm
        self.attention_norm = self.mixer.pre_avg_layernorm1 if self.mamba1 else self.mixer.attention.norm
        self.ssm_norm = self.mixer.pre_avg_layernorm2 if self.mamba1 else self.mixer.ssm.norm
        self.conv = self.mixer.conv1d if self.mamba1 else self.mixer.ssm.conv1d
        # in_proj rows: q | k | v | x | z (Mamba-1), q | k | v | z | x | B | C | dt (Mamba-2)
        self.x_start = sum(self.mixer.split_sizes[: 3 if self.mamba1 else 4])


def _copy(net):
    copy = HymbaForCausalLM(net.config).eval()
    copy.load_state_dict(net.state_dict())
    return copy


def _restricted_rms(x: torch.Tensor, keep: torch.Tensor, eps: float) -> torch.Tensor:
    """x normalised by the RMS over channels ``keep`` only (other channels returned as they are)."""
    part = x[..., keep]
    out = x.clone()
    out[..., keep] = part * torch.rsqrt(part.pow(2).mean(-1, keepdim=True) + eps)
    return out


def masked_reference(net, plan):
    """The unpruned model with every mixer column ``plan`` drops zeroed, its branch norms over the
    kept channels: out_proj columns and the SSM inputs (in_proj x rows, conv bias) outside the kept
    columns zeroed (Mamba-1's x_proj reads every channel), the attention RMSNorm over the kept
    columns, the SSM's gated RMSNorm over each of its groups' kept columns. Returns (model, hooks)."""
    model, handles = _copy(net), []
    config = net.config
    d = config.mamba_num_heads * config.mamba_head_dim
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            if i not in plan.attention_heads:
                continue
            parts = Parts(block)
            keep = (plan.mamba_heads[i][:, None] * config.mamba_head_dim + plan.mamba_channels[i]).flatten()
            dropped = torch.ones(d, dtype=torch.bool)
            dropped[keep] = False
            parts.mixer.out_proj.weight[:, dropped] = 0
            parts.mixer.in_proj.weight[parts.x_start + torch.arange(d)[dropped]] = 0
            parts.conv.bias[:d][dropped] = 0  # silu(0) = 0: the dropped SSM channels carry nothing

            def attention(module, args, output, keep=keep):
                return module.weight * _restricted_rms(args[0].float(), keep, module.eps).to(args[0].dtype)

            def ssm(module, args, kwargs, output, keep=keep):
                x = args[0].float() * F.silu(kwargs["gate"].float())
                size = module.group_size
                for g in range(d // size):
                    x = _restricted_rms(x, keep[(keep >= g * size) & (keep < (g + 1) * size)], module.eps)
                return module.weight * x.to(args[0].dtype)

            handles.append(parts.attention_norm.register_forward_hook(attention))
            handles.append(parts.ssm_norm.register_forward_hook(ssm, with_kwargs=True))
    return model, handles


def _compare(pruned, reference, ids, handles=()):
    try:
        expected = logits(reference, ids)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(logits(pruned, ids), expected, atol=ATOL, rtol=0)


# ------------------------------------------------------------------- width


def test_pruning_to_own_sizes_is_the_identity(net, input_ids):
    same = prune_model(net, random_scores(net.config, 0), PruneTarget())
    assert torch.equal(logits(net, input_ids), logits(same, input_ids))
    assert same.lm_head.weight is same.model.embed_tokens.weight  # still tied


def test_the_masked_reference_of_everything_is_the_unpruned_model(net, input_ids):
    plan = make_plan(net.config, random_scores(net.config, 0), PruneTarget())
    reference, handles = masked_reference(net, plan)
    _compare(net, reference, input_ids, handles)


def test_removing_ffn_neurons_equals_zeroing_them(net, input_ids):
    scores, target = random_scores(net.config, 3), PruneTarget(intermediate_size=80)
    plan = make_plan(net.config, scores, target)
    masked = _copy(net)
    with torch.no_grad():
        for i, keep in plan.ffn.items():
            drop = torch.ones(net.config.intermediate_size, dtype=torch.bool)
            drop[keep] = False
            Parts(masked.model.layers[i]).mlp.gate_proj.weight[drop] = 0  # silu(0) * up = 0: the neuron is silent
    _compare(prune_model(net, scores, target), masked, input_ids)


def test_removing_hidden_channels_equals_zeroing_them(net, input_ids):
    """Embedding, meta-token and tied LM-head columns and every write to the residual stream zeroed;
    each hidden RMSNorm's mean then runs over W channels where the pruned one runs over the n kept:
    the same function with eps * n / W and the weight scaled by sqrt(n / W)."""
    scores, target = random_scores(net.config, 4), PruneTarget(hidden_size=40)
    plan = make_plan(net.config, scores, target)
    W, n = net.config.hidden_size, len(plan.hidden)
    drop = torch.ones(W, dtype=torch.bool)
    drop[plan.hidden] = False
    masked = _copy(net)
    with torch.no_grad():
        masked.model.embed_tokens.weight[:, drop] = 0  # the LM head is the same tensor
        masked.model.meta_token_embeddings[:, drop] = 0
        norms = [masked.model.final_norm]
        for block in masked.model.layers:
            parts = Parts(block)
            parts.mixer.out_proj.weight[drop] = 0
            parts.mlp.down_proj.weight[drop] = 0
            norms += [block.input_layernorm, parts.mlp_norm]
        for norm in norms:
            norm.weight.mul_(math.sqrt(n / W))
            norm.eps = norm.eps * n / W
    assert masked.lm_head.weight is masked.model.embed_tokens.weight
    _compare(prune_model(net, scores, target), masked, input_ids)


MIXER_TARGETS = {
    "hybrid heads": PruneTarget(num_attention_heads=2),  # 1 of 2 query heads per KV group, with its 2 SSM heads
    "hybrid heads (by SSM heads)": PruneTarget(mamba_num_heads=4),
    "sub-heads": PruneTarget(num_attention_heads=4, mamba_num_heads=4),  # 1 of the 2 SSM heads of every head
    "channels": PruneTarget(mamba_head_dim=10),
    "all": PruneTarget(num_attention_heads=2, mamba_num_heads=2, mamba_head_dim=10, hidden_size=48),
}


@pytest.mark.parametrize("target", MIXER_TARGETS.values(), ids=MIXER_TARGETS.keys())
def test_pruning_the_mixer_equals_zeroing_its_out_proj_columns(net, input_ids, target):
    scores = random_scores(net.config, 5)
    pruned, plan = prune(net, scores, target)
    config, new = net.config, pruned.config
    assert config_problems(new) == {}
    assert new.num_attention_heads * new.v_head_dim == new.mamba_num_heads * new.mamba_head_dim
    for i in plan.layers:  # query heads equal per KV group, SSM heads equal per SSM group
        per_kv = config.num_attention_heads // config.num_key_value_heads
        assert torch.bincount(plan.attention_heads[i] // per_kv).unique().numel() == 1
        per_group = config.mamba_num_heads // config.n_groups
        assert torch.bincount(plan.mamba_heads[i] // per_group, minlength=config.n_groups).unique().numel() == 1
    if target.hidden_size is None:
        reference, handles = masked_reference(net, plan)
        _compare(pruned, reference, input_ids, handles)
    else:  # with the hidden channels too: against the same mixer pruned at full hidden size, then sliced
        mixer_only = prune_model(net, scores, target.model_copy(update={"hidden_size": None}))
        both = prune_model(mixer_only, _with_hidden(scores, mixer_only.config), PruneTarget(hidden_size=48))
        torch.testing.assert_close(logits(pruned, input_ids), logits(both, input_ids), atol=ATOL, rtol=0)


def _with_hidden(scores, config):
    """Random scores for ``config`` whose hidden scores are ``scores``' (the same channels win)."""
    return random_scores(config, 0) | {"hidden": scores["hidden"]}


def test_kv_shared_layers_keep_the_same_value_channels(net, input_ids):
    """A consumer attends with its producer's values: the value channels (sub-heads x SSM channels)
    are chosen once per KV-sharing group, even when each layer's own scores disagree."""
    scores = random_scores(net.config, 6)
    for i in range(net.config.num_hidden_layers):  # every layer prefers other channels and sub-heads
        scores[f"mamba.{i}"][:, (3 * i) % 16] += 100
        scores[f"hybrid.{i}"].view(4, 2, 16)[:, i % 2] += 100
    target = PruneTarget(num_attention_heads=4, mamba_num_heads=4, mamba_head_dim=8)
    pruned, plan = prune(net, scores, target)
    for group in net.config.kv_reuse_groups:
        for i in group[1:]:
            assert torch.equal(plan.value_channels[i], plan.value_channels[group[0]])
            assert torch.equal(plan.mamba_channels[i], plan.mamba_channels[group[0]])
    assert not torch.equal(plan.value_channels[1], plan.value_channels[4])  # groups choose independently
    for new_i, block in enumerate(pruned.model.layers):
        owns, mixer = pruned.config.kv_producer(new_i) == new_i, Parts(block).mixer
        assert mixer.attention.owns_kv == owns and (mixer.split_sizes[2] > 0) == owns
    reference, handles = masked_reference(net, plan)
    _compare(pruned, reference, input_ids, handles)


def test_head_counts_that_cannot_be_kept_exactly_are_explained():
    config = build_config("micro", OVERRIDES)
    assert mixer_shape(config, PruneTarget(num_attention_heads=2))[0].ssm_heads == 4
    assert "num_attention_heads" in mixer_shape(config, PruneTarget(num_attention_heads=3))[1]
    assert "multiple of 2" in mixer_shape(config, PruneTarget(mamba_num_heads=3))[1]["mamba_num_heads"]
    assert "times 1..2" in mixer_shape(config, PruneTarget(num_attention_heads=2, mamba_num_heads=6))[1]["mamba_num_heads"]
    assert "group-aware" in str(mixer_shape(config, PruneTarget(mamba_num_heads=4, num_attention_heads=4,
                                                                mamba_head_selection="global"))[1])
    # tiny: each SSM group spans one attention head's columns, so query heads cannot go, sub-heads can
    tiny = build_config("tiny")
    assert "multiple of 4" in str(mixer_shape(tiny, PruneTarget(num_attention_heads=2))[1])
    assert mixer_shape(tiny, PruneTarget(num_attention_heads=4, mamba_num_heads=4))[1] == {}
    # an attention head over two SSM groups: every head and every sub-head stays
    split = build_config("micro", OVERRIDES | {"n_groups": 8})
    assert "same number of heads" in str(mixer_shape(split, PruneTarget(num_attention_heads=4, mamba_num_heads=4))[1])
    # value heads that do not span whole SSM heads: only hidden, FFN and depth can be pruned
    odd = build_config("micro", {"v_head_dim": 24, "mamba_num_heads": 6, "mamba_head_dim": 16, "n_groups": 2})
    assert "not a multiple of mamba_head_dim" in str(target_problems(odd, PruneTarget(mamba_head_dim=8)))
    assert target_problems(odd, PruneTarget(hidden_size=32, intermediate_size=64, drop_layers=[1])) == {}
    torch.manual_seed(0)
    odd_net = HymbaForCausalLM(odd).eval()
    small = prune_model(odd_net, random_scores(odd, 0), PruneTarget(hidden_size=32, drop_layers=[1]))
    assert (small.config.v_head_dim, small.config.mamba_num_heads, small.config.layer_pattern) == (24, 6, "GGWwG")


def test_r1_layout_prunes_attention_and_ssm_heads_together(layout, input_ids):
    """The stock micro preset: value heads as wide as SSM heads (r = 1), so a query head and one
    SSM head share their out_proj columns."""
    net = _model({"initializer_range": 0.1, "ssm_type": layout})
    scores = random_scores(net.config, 7)
    pruned, plan = prune(net, scores, PruneTarget(mamba_num_heads=2, mamba_head_dim=12))
    assert (pruned.config.num_attention_heads, pruned.config.v_head_dim) == (2, 12)
    reference, handles = masked_reference(net, plan)
    _compare(pruned, reference, input_ids, handles)


# ------------------------------------------------------------------- depth


def _skipping(net, layers):
    """Forward hooks that replace each of ``layers``' output with its input (a producer still
    computes and hands over its K/V)."""
    return [net.model.layers[i].register_forward_hook(lambda module, args, output: args[0]) for i in layers]


DEPTH = {
    "consumer": ([2], "GWGWwwG", [[3, 4, 5]], {}),
    "producer of a pair": ([1], "GWGWwwG", [[3, 4, 5]], {2: 1}),
    "producer of a triple": ([4], "GWwGWwG", [[1, 2], [4, 5]], {5: 4}),
    "producer and its first consumer": ([4, 5], "GWwGWG", [[1, 2]], {6: 4}),
    "every window layer": ([1, 2, 4, 5, 6], "GGG", [], {}),
}


@pytest.mark.parametrize("drop, pattern, groups, promoted", DEPTH.values(), ids=DEPTH.keys())
def test_dropping_layers_equals_skipping_them_and_repairs_kv_sharing(net, input_ids, drop, pattern, groups, promoted):
    pruned, plan = prune(net, random_scores(net.config, 0), PruneTarget(drop_layers=drop))
    new = pruned.config
    assert (new.layer_pattern, new.kv_reuse_groups, plan.promoted) == (pattern, groups, promoted)
    assert [plan.layers[g] for g in new.global_attn_layers] == [0, 3, 7]  # every global layer kept
    assert config_problems(new) == {}
    _compare(pruned, net, input_ids, _skipping(net, drop))


def test_depth_by_score_keeps_the_global_layers(net):
    scores = random_scores(net.config, 0)
    scores["layer_kl"][[0, 3, 7]] = -1  # the least important by score, and kept anyway
    pruned, plan = prune(net, scores, PruneTarget(num_layers=5))
    assert {0, 3, 7} <= set(plan.layers) and len(plan.layers) == 5
    assert config_problems(pruned.config) == {}
    assert target_problems(net.config, PruneTarget(num_layers=2))["num_layers"].startswith("depth pruning keeps the 3")
    assert "[3] are global-attention layers" in target_problems(net.config, PruneTarget(drop_layers=[2, 3]))["drop_layers"]


def test_layer_kl_of_a_producer_is_the_kl_of_the_model_pruned_without_it(net, micro_data):
    """The depth score skips a layer with a hook; pruning a producer re-pairs its consumers so that
    the pruned model computes exactly that, so the score is the KL pruning that layer costs."""
    from model.losses import kd_per_token

    data = PackedTokens(micro_data.uri, "train")
    spec = ImportanceSpec(layer_samples=2, batch_size=2)
    kl = layer_kl_scores(net, data, spec)
    ids = data.batch(calibration_rows(data, spec.layer_samples, spec.seed + 1))[0]
    full = logits(net, ids)
    for layer in (1, 4):  # the producers of the pair and of the triple
        without = logits(prune_model(net, random_scores(net.config, 0), PruneTarget(drop_layers=[layer])), ids)
        expected = kd_per_token(without.flatten(0, 1), full.flatten(0, 1)).mean()
        torch.testing.assert_close(kl[layer], expected, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------- importance, loading, stages


def _l2_mean(chunks):
    per_sample = torch.cat([x.abs().mean(1) for x in chunks])  # (B, C)
    return per_sample.pow(2).sum(0).sqrt()


def test_importance_reads_the_x_slice_and_out_proj_input_of_every_layer(net, micro_data):
    data = PackedTokens(micro_data.uri, "train")
    spec = ImportanceSpec(samples=4, batch_size=2, layer_samples=2)
    scores = estimate_importance(net, data, spec)
    assert score_problems(net.config, scores) == []
    rows = calibration_rows(data, spec.samples, spec.seed)
    captured = {}
    d = net.config.mamba_num_heads * net.config.mamba_head_dim

    def keep(name):
        return lambda module, args, output: captured.setdefault(name, []).append(
            (args[0] if name.startswith("out") else output).detach())

    handles = []
    for i in (3, 4, 5):  # a global layer, a producer, a consumer (no k/v rows)
        mixer = Parts(net.model.layers[i]).mixer
        handles += [mixer.in_proj.register_forward_hook(keep(f"in.{i}")),
                    mixer.out_proj.register_forward_hook(keep(f"out.{i}"))]
    with torch.no_grad():
        for start in range(0, len(rows), spec.batch_size):
            net(input_ids=data.batch(rows[start : start + spec.batch_size])[0], use_cache=False)
    for h in handles:
        h.remove()
    for i in (3, 4, 5):
        x_start = Parts(net.model.layers[i]).x_start
        x = [out[..., x_start : x_start + d] for out in captured[f"in.{i}"]]
        torch.testing.assert_close(scores[f"mamba.{i}"], _l2_mean(x).view(8, 16))
        torch.testing.assert_close(scores[f"hybrid.{i}"], _l2_mean(captured[f"out.{i}"]))
    pruned = prune_model(net, scores, PruneTarget(hidden_size=48, num_attention_heads=2, num_layers=6))
    assert pruned.config.hidden_size == 48 and pruned.config.num_hidden_layers == 6


def test_a_pruned_checkpoint_saves_and_loads(net, tmp_path, input_ids):
    from transformers import AutoModelForCausalLM

    pruned = prune_model(net, random_scores(net.config, 8),
                         PruneTarget(hidden_size=48, num_attention_heads=2, mamba_head_dim=12, drop_layers=[4]))
    pruned.save_pretrained(tmp_path / "student")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert type(loaded) is HymbaForCausalLM and loaded.config.layer_pattern == "GWwGWwG"
    assert torch.equal(logits(loaded, input_ids), logits(pruned, input_ids))
    generated = loaded.generate(input_ids[:1, :5], max_new_tokens=4, do_sample=False)  # cached decoding
    assert generated.shape == (1, 9)


def test_an_unknown_ssm_layout_is_refused_before_any_work():
    config = build_config("micro")
    check_compressible(config)
    check_compressible(build_config("micro", {"ssm_type": "mamba1"}))
    config.ssm_type = "mamba3"
    with pytest.raises(ValueError, match="ssm_type 'mamba3' cannot be compressed: importance and pruning cover"):
        check_compressible(config)
    assert "mamba3" in target_problems(config, PruneTarget())["model"]


def test_importance_and_prune_stages_compress_a_hymba_teacher(layout, micro_data, tmp_path):
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    from compression import importance_stage, prune_stage
    from compression.search import enumerate_candidates
    from compression.spec import Budget, SearchSpace, SearchSpec
    from model import pretrain_stage
    from model.contract import StageContext, local_folder
    from model.device import DevicePolicy
    from model.pretrain_stage import PretrainSpec
    from model.spec import ModelSpec, TrainSpec
    from store.local import LocalStore

    store, context = LocalStore(tmp_path / "store"), StageContext("hymba", device=DevicePolicy("cpu"))
    overrides = {k: v for k, v in OVERRIDES.items() if k != "initializer_range"} | {"ssm_type": layout}
    train = TrainSpec(steps=2, batch_size=4, micro_batch_size=4, warmup_steps=1, checkpoint_every=2, eval_every=2,
                      eval_batches=1)
    teacher = pretrain_stage.run(PretrainSpec(model=ModelSpec(family="hymba", preset="micro", overrides=overrides),
                                              train=train), {"data": micro_data}, store, context)
    inputs = {"teacher": teacher, "data": micro_data}
    scores_ref = importance_stage.run(ImportanceSpec(samples=4, batch_size=4, layer_samples=2), inputs, store, context)
    scores = importance_stage.load(store, scores_ref)
    target = PruneTarget(hidden_size=48, num_attention_heads=2, mamba_head_dim=12, num_layers=6)
    student = prune_stage.run(prune_stage.PruneSpec(target=target), {"teacher": teacher, "scores": scores_ref},
                              store, context)
    assert student.architecture.family == "hymba" and student.architecture.parameters < teacher.architecture.parameters
    folder = local_folder(store, student)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.v_head_dim) == (48, 6, 24)
    record = json.loads((folder / "pruning.json").read_text())
    assert len(record["kept_layers"]) == 6 and {0, 3, 7} <= set(record["kept_layers"])

    # The search's candidates come from the same scores: every one valid, globals kept, Hymba's cache counted.
    teacher_config = AutoConfig.from_pretrained(local_folder(store, teacher))
    space = SearchSpace(hidden_size=[48, 64], num_attention_heads=[2, 3, 4], num_layers=[5, 8])
    spec = SearchSpec(space=space, budget=Budget(memory_gib=1.0, context=256))
    candidates, rejected = enumerate_candidates(teacher_config, scores, spec)
    assert len(candidates) == 8 and rejected["invalid"] == 4  # 3 heads: not equal per KV group
    for c in candidates:
        assert target_problems(teacher_config, PruneTarget(**c.target)) == {}
        assert c.architecture["layer_pattern"].count("G") == 3
        assert c.memory_bytes > 2 * c.parameters  # weights in bf16 plus a cache


def test_distillation_aligns_hymba_blocks_past_the_meta_tokens(net, input_ids):
    """The cosine term compares block outputs position by position; a Hymba block's output leads
    with the meta tokens, which are not targets."""
    from compression.distill import BlockAlignment, make_kd_loss
    from compression.spec import DistillSpec

    spec, mask = DistillSpec(cosine_weight=1.0), torch.ones(2, input_ids.shape[1] - 1, dtype=torch.bool)
    pruned, plan = prune(net, random_scores(net.config, 0), PruneTarget(drop_layers=[2]))
    with torch.no_grad():
        itself = make_kd_loss(net, spec, BlockAlignment({i: i for i in range(8)}))(net, input_ids, mask)
        student = make_kd_loss(net, spec, BlockAlignment(dict(enumerate(plan.layers))))(pruned, input_ids, mask)
    assert abs(float(itself)) < 1e-3 and float(student) > 0.01


def test_the_prune_command_prunes_a_hymba_checkpoint(net, tmp_path, capsys):
    from compression.importance import save_scores
    from model.tokenizer import train_bpe

    from .conftest import run_cli

    teacher, scores = tmp_path / "teacher", tmp_path / "scores.safetensors"
    net.save_pretrained(teacher)
    train_bpe(["def f(x):\n    return x\n" * 50], vocab_size=net.config.vocab_size).save_pretrained(teacher)
    save_scores(random_scores(net.config, 0), scores, {})
    code, _, err = run_cli("prune", str(teacher), str(tmp_path / "bad"), "--target", '{"drop_layers": [3]}',
                           capsys=capsys)
    assert code == 2 and "target.drop_layers" in err and "global-attention" in err, err
    code, out, err = run_cli("prune", str(teacher), str(tmp_path / "student"), "--target",
                             '{"num_attention_heads": 2, "drop_layers": [4]}', "--scores", str(scores), capsys=capsys)
    assert code == 0, err
    assert "layers GWwGWwG" in out
