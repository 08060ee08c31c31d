"""Hymba (model/hymba/) through importance and pruning, in both SSM layouts: the factory's
Mamba-2 heads (``ssm_type: mamba2``) and the release's Mamba-1 channels (``ssm_type: mamba1``).

compression/importance.py and compression/prune.py dispatch here by ``config.model_type``;
the generic pieces (the aggregation, ``_top``, ``_top_per_group``, the slicing helpers, the
calibration and KL passes) stay there. docs/compression.md 7 has the design.

One layer (docs/architectures.md 2.2), Ha query heads of Dq, KV heads of Dq (keys) and Dv
(values), Hs SSM heads of P channels in G groups, state N, d = Ha * Dv = Hs * P:

    input_layernorm.weight                  [hidden]
    mixer.in_proj.weight     rows  q[Ha*Dq] | k[KV*Dq] | v[KV*Dv] | z[d] | x[d] | B[G*N] | C[G*N] | dt[Hs]
                             cols  hidden   (k and v only on a KV producer)
    mixer.attention.norm.weight             [d]  RMSNorm over the whole attention output (b1)
    mixer.ssm.conv1d                        chans x[d] | B | C
    mixer.ssm.dt_bias, A_log, D             [Hs]
    mixer.ssm.norm.weight                   [d]  gated RMSNorm over G groups of d/G (b2)
    mixer.out_proj.weight                   [hidden, d], applied to (attention + ssm) / 2
    pre_mlp_layernorm.weight, mlp.{gate,up,down}_proj (SwiGLU)
    model: embed_tokens (lm_head tied to it by default), meta_tokens [M, hidden], norm

The Mamba-1 layer, under the release's names (mamba.*, pre_moe_layernorm, moe.experts.0.*;
model.memory_tokens, model.final_layernorm):

    mamba.in_proj.weight     rows  q | k | v | x[d] | z[d]
    mamba.pre_avg_layernorm1, pre_avg_layernorm2   [d]  b1, and b2 (gated RMSNorm over all of d)
    mamba.conv1d [d], x_proj.0.weight [R + 2N, d], dt_proj.0 (weight [d, R], bias [d]),
    mamba.A_log.0 [d, N], D.0 [d]                  every SSM tensor per channel of d
    mamba.dt_layernorm, B_layernorm, C_layernorm   [R], [N], [N]: never pruned

Mamba-1 channels have no groups (B and C are shared by all of them), so the axes below apply
with G = 1, reading its d as the config's Hs x P. x_proj reads every channel, so a dropped
channel must carry nothing into it: pruning equals zeroing that channel's x (and conv bias).

**The shared out_proj couples the branches.** Its column j reads attention channel j (query head
j // Dv, value channel j % Dv) *and* SSM channel j (SSM head j // P, channel j % P). A pruned
model is exact only if both branches keep the same columns in the same order, so the kept
columns must be a product set in both layouts. With Dv = r * P (an attention head spans the
columns of r SSM heads, its *sub-heads*) that is

    columns = { h*Dv + i*P + c : h in kept query heads, i in kept sub-heads, c in kept channels }

that is, SSM heads {h*r + i}, the same SSM channels in every head, and value channels
{i*P + c} in every KV head. Hence three mixer axes:

    hybrid heads   query head h with its r SSM heads                      num_attention_heads
    sub-heads      the same sub-heads i in every kept hybrid head          mamba_num_heads / heads
    SSM channels   the same channels c in every SSM head (value channels   mamba_head_dim
                   follow)

KV heads and the key/query width are never pruned; B, C, N, G, R and the conv kernel neither.
A consumer layer attends with its producer's values, so the value channels (sub-heads and SSM
channels) are chosen once per KV-sharing group; query heads are chosen per layer. Meta tokens
are kept (their hidden channels are sliced). Depth pruning keeps every global-attention layer;
when a KV producer is dropped, its first kept consumer becomes the producer and inherits the
dropped layer's k/v rows of in_proj, rescaled column-wise by the ratio of the two layers'
input-norm weights, so it computes exactly the K/V the dropped producer computed from the
same residual stream (dropping a layer then equals skipping its residual update).

Scores (one calibration pass, compression/importance.py):

    hidden      input_layernorm and pre_mlp_layernorm outputs, summed over layers     (hidden,)
    ffn.{i}     gate_proj output (pre-activation) or down_proj input (post)           (intermediate,)
    mamba.{i}   x slice of in_proj's output, before the conv: SSM channels            (Hs, P)
    hybrid.{i}  out_proj's input, (attention + ssm) / 2, per column: hybrid heads and
                sub-heads, on the kept channels                                       (d,)
    layer_kl, layer_mse, layer_cosine                                                 (layers,)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from compression.importance import Scores, layer_score
from compression.prune import PrunePlan, _cols, _rows, _top, _top_per_group, depth_problems
from compression.spec import PruneTarget

SUPPORTED_SSM_TYPES = ("mamba2", "mamba1")


def _ssm_type(config) -> str:
    return getattr(config, "ssm_type", "mamba2")  # configs written before Mamba-1 existed are Mamba-2


@dataclass(frozen=True)
class _Names:
    """Where a layout keeps its modules (Mamba-1 is the release's layout, under the release's names)."""

    mixer: str
    mlp: str
    mlp_norm: str
    meta_tokens: str
    final_norm: str


_NAMES = {"mamba2": _Names("mixer", "mlp", "pre_mlp_layernorm", "model.meta_tokens", "model.norm"),
          "mamba1": _Names("mamba", "moe.experts.0", "pre_moe_layernorm", "model.memory_tokens", "model.final_layernorm")}


def _names(config) -> _Names:
    return _NAMES[_ssm_type(config)]


def _ssm_groups(config) -> int:
    """B/C groups that SSM heads must stay balanced over (Mamba-1 shares one B and C by every channel)."""
    return 1 if _ssm_type(config) == "mamba1" else config.n_groups


def layout_problem(config) -> str | None:
    """Why this Hymba layout cannot be compressed at all, or None."""
    if _ssm_type(config) not in SUPPORTED_SSM_TYPES:
        return (f"Hymba with ssm_type {_ssm_type(config)!r} cannot be compressed: importance and pruning cover "
                f"ssm_type {' and '.join(repr(t) for t in SUPPORTED_SSM_TYPES)}")
    return None


# --------------------------------------------------------------------------------------
# Importance: hooks and score shapes
# --------------------------------------------------------------------------------------


def _in_proj_offsets(config, owns_kv: bool) -> dict[str, int]:
    """First row of each part of a layer's in_proj (q | k | v | z | x | B | C | dt; q | k | v | x | z
    for Mamba-1)."""
    from model.hymba import in_proj_rows

    offsets, start = {}, 0
    for name, size in in_proj_rows(config, owns_kv).items():
        offsets[name] = start
        start += size
    return offsets


def importance_hooks(i: int, block, config, spec, record, record_input) -> list:
    """Forward hooks on layer ``i`` of a HymbaForCausalLM (``record`` / ``record_input`` from
    importance.activation_scores make a hook that adds to the stats of a key)."""
    names = _names(config)
    handles = [block.input_layernorm.register_forward_hook(record(f"norm.{i}")),
               block.get_submodule(names.mlp_norm).register_forward_hook(record(f"norm.{i}.mlp"))]
    mlp = block.get_submodule(names.mlp)
    if spec.ffn_activation == "pre":  # SwiGLU: the activation's input is gate_proj's output
        handles.append(mlp.gate_proj.register_forward_hook(record(f"ffn.{i}")))
    else:
        handles.append(mlp.down_proj.register_forward_pre_hook(record_input(f"ffn.{i}")))
    mixer = block.get_submodule(names.mixer)
    x = _in_proj_offsets(config, owns_kv=config.kv_producer(i) == i)["x"]
    d = config.mamba_num_heads * config.mamba_head_dim
    handles.append(mixer.in_proj.register_forward_hook(record(f"mamba.{i}", lambda out: out[..., x : x + d])))
    handles.append(mixer.out_proj.register_forward_pre_hook(record_input(f"hybrid.{i}")))
    return handles


def score_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every score a Hymba model's importance pass saves, with its shape."""
    layers = config.num_hidden_layers
    d = config.mamba_num_heads * config.mamba_head_dim
    shapes = {"hidden": (config.hidden_size,)}
    for i in range(layers):
        shapes[f"ffn.{i}"] = (config.intermediate_size,)
        shapes[f"mamba.{i}"] = (config.mamba_num_heads, config.mamba_head_dim)
        shapes[f"hybrid.{i}"] = (d,)
    return shapes | {"layer_kl": (layers,), "layer_cosine": (layers,)}


# --------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixerShape:
    """How a mixer-width target decomposes (see the module docstring)."""

    heads: int  # query (hybrid) heads kept per layer
    sub_heads: int  # SSM heads kept under each of them
    channels: int  # channels kept per SSM head
    head_cells: int  # kept query heads are spread equally over this many contiguous cells
    sub_segments: int  # kept sub-heads are spread equally over this many contiguous segments of [0, r)

    @property
    def ssm_heads(self) -> int:
        return self.heads * self.sub_heads


def _cells(config) -> tuple[int, int, int] | str:
    """(r, head_cells, sub_segments) for this config, or why its heads cannot be pruned exactly.

    Query heads must stay equal per KV group; SSM heads equal per SSM group. When an SSM group
    spans whole attention heads, both hold if the kept query heads are equal per cell of the finer
    of the two partitions (they must nest); when an attention head spans several SSM groups, every
    query head must stay and the sub-heads are kept equally per group (segment)."""
    heads, ssm_heads = config.num_attention_heads, config.mamba_num_heads
    if ssm_heads % heads:
        return (f"v_head_dim ({config.v_head_dim}) is not a multiple of mamba_head_dim ({config.mamba_head_dim}), so "
                "an attention head does not span whole SSM heads of the out_proj columns both branches share")
    r = ssm_heads // heads
    per_kv = heads // config.num_key_value_heads
    per_group = ssm_heads // _ssm_groups(config)
    if per_group % r == 0:  # an SSM group spans per_group // r whole attention heads
        small, big = sorted((per_kv, per_group // r))
        if big % small:
            return (f"KV groups ({per_kv} query heads) and SSM groups ({per_group // r} query heads' columns) do "
                    "not nest, so no head count keeps both equal")
        return r, heads // small, 1
    if r % per_group == 0:  # an attention head spans r // per_group SSM groups: every query head stays
        return r, heads, r // per_group
    return f"SSM groups of {per_group} heads neither cover whole attention heads ({r} SSM heads each) nor divide one"


def mixer_shape(config, target: PruneTarget) -> tuple[MixerShape | None, dict[str, str]]:
    """The target's mixer width (None: the mixer stays whole), or the problems with it. An omitted
    head count follows the other at the teacher's ratio r (whole hybrid heads); give both to keep
    fewer sub-heads."""
    heads, ssm_heads, channels = target.num_attention_heads, target.mamba_num_heads, target.mamba_head_dim
    source = {"num_attention_heads": config.num_attention_heads, "mamba_num_heads": config.mamba_num_heads,
              "mamba_head_dim": config.mamba_head_dim}
    problems = {name: f"{getattr(target, name)} is larger than the source model's {value}"
                for name, value in source.items() if getattr(target, name) is not None and getattr(target, name) > value}
    if problems:
        return None, problems
    if heads is None and ssm_heads is None and channels is None:
        return None, {}
    cells = _cells(config)
    if isinstance(cells, str):
        field_name = "num_attention_heads" if heads is not None else "mamba_num_heads" if ssm_heads is not None \
            else "mamba_head_dim"
        return None, {field_name: f"cannot be pruned exactly in this Hymba: {cells}"}
    r, head_cells, segments = cells
    if heads is None and ssm_heads is None:
        heads, ssm_heads = config.num_attention_heads, config.mamba_num_heads
    elif ssm_heads is None:
        ssm_heads = heads * r
    elif heads is None:
        if ssm_heads % r:
            return None, {"mamba_num_heads": (
                f"must be a multiple of {r} (the SSM heads under one attention head's out_proj columns) to drop whole "
                f"hybrid heads, got {ssm_heads}; give num_attention_heads too to keep fewer SSM heads per attention "
                "head")}
        heads = ssm_heads // r
    if ssm_heads % heads or not 1 <= ssm_heads // heads <= r:
        return None, {"mamba_num_heads": (
            f"must be num_attention_heads ({heads}) times 1..{r} (each kept attention head keeps the same number "
            f"of the {r} SSM heads under its out_proj columns), got {ssm_heads}")}
    sub = ssm_heads // heads
    if heads % head_cells:
        given = "num_attention_heads" if target.num_attention_heads is not None else "mamba_num_heads"
        return None, {given: (
            f"keeps {heads} query heads (with {sub} SSM heads each), which must be a multiple of {head_cells}: query "
            f"heads are kept in equal numbers per KV group ({config.num_attention_heads // config.num_key_value_heads}"
            f" heads) and their SSM heads in equal numbers per SSM group "
            f"({config.mamba_num_heads // _ssm_groups(config)} heads)")}
    if sub % segments:
        return None, {"mamba_num_heads": (
            f"every SSM group must keep the same number of heads: keep a multiple of {segments} of the {r} SSM heads "
            f"under each attention head, got {sub}")}
    if sub != r and target.mamba_head_selection != "group_aware":
        return None, {"mamba_head_selection": "Hymba keeps SSM heads group-aware only (they follow the query heads)"}
    return MixerShape(heads, sub, channels or config.mamba_head_dim, head_cells, segments), {}


def target_problems(config, target: PruneTarget) -> dict[str, str]:
    """Field -> why ``target`` cannot be cut from this Hymba; empty when it can."""
    if problem := layout_problem(config):
        return {"model": problem}
    problems = {}
    for name in ("hidden_size", "intermediate_size"):
        value, source = getattr(target, name), getattr(config, name)
        if value is not None and value > source:
            problems[name] = f"{value} is larger than the source model's {source}"
    problems |= mixer_shape(config, target)[1]
    num_layers, global_layers = config.num_hidden_layers, sorted(config.global_attn_layers)
    problems |= depth_problems(target, num_layers)
    if "num_layers" not in problems and target.num_layers is not None and target.num_layers < len(global_layers):
        problems["num_layers"] = (f"depth pruning keeps the {len(global_layers)} global-attention layers "
                                  f"{global_layers}; keep at least that many, got {target.num_layers}")
    if "drop_layers" not in problems and target.drop_layers is not None:
        if dropped_globals := sorted(set(target.drop_layers) & set(global_layers)):
            problems["drop_layers"] = (f"layers {dropped_globals} are global-attention layers, which depth pruning "
                                       f"keeps (globals: {global_layers})")
    return problems


def droppable_layers(config) -> list[int]:
    """Layers depth pruning may drop: every window-attention layer."""
    return [i for i in range(config.num_hidden_layers) if i not in set(config.global_attn_layers)]


def kept_layers(config, scores: Scores, target: PruneTarget) -> list[int]:
    num_layers = config.num_hidden_layers
    if target.drop_layers is not None:
        return [i for i in range(num_layers) if i not in set(target.drop_layers)]
    if target.num_layers is None:
        return list(range(num_layers))
    candidates = droppable_layers(config)
    keep = target.num_layers - (num_layers - len(candidates))  # every global layer stays
    score = layer_score(scores, target.layer_metric)[candidates]
    chosen = {candidates[j] for j in _top(score, keep).tolist()}
    return [i for i in range(num_layers) if i not in candidates or i in chosen]


# --------------------------------------------------------------------------------------
# KV sharing after depth pruning
# --------------------------------------------------------------------------------------


def regroup_kv(config, layers: list[int]) -> tuple[list[list[int]], dict[int, int]]:
    """KV-sharing groups of a model keeping ``layers`` (original indices, in order), in the new
    indices, and the promoted layers: {kept consumer: the dropped producer it replaces}.

    Each group keeps its kept members (still consecutive once renumbered). When its producer is
    dropped, the first kept consumer becomes the producer (it inherits the dropped producer's
    k/v projection) and the others consume it; a group left with one layer is no group."""
    new_index = {layer: n for n, layer in enumerate(layers)}
    groups, promoted = [], {}
    for group in config.kv_reuse_groups:
        members = [i for i in group if i in new_index]
        if members and members[0] != group[0]:
            promoted[members[0]] = group[0]
        if len(members) >= 2:
            groups.append([new_index[i] for i in members])
    return groups, promoted


def kv_units(config) -> list[list[int]]:
    """Layers that must keep the same value channels: each KV-sharing group, and every other
    layer on its own, in layer order."""
    grouped = {i: group for group in config.kv_reuse_groups for i in group}
    units, seen = [], set()
    for i in range(config.num_hidden_layers):
        if i not in seen:
            unit = list(grouped.get(i, [i]))
            units.append(unit)
            seen |= set(unit)
    return units


# --------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------


@dataclass
class HymbaPrunePlan(PrunePlan):
    """PrunePlan's kept indices, by original layer index, plus Hymba's: ``attention_heads`` are the
    kept query (hybrid) heads, ``mamba_heads`` the SSM heads under them, ``value_channels`` the
    kept channels of every value head (the kept sub-heads' kept channels), and the depth
    re-pairing."""

    value_channels: dict[int, torch.Tensor] = field(default_factory=dict)  # of every value head
    kv_groups: list[list[int]] = field(default_factory=list)  # new indices
    promoted: dict[int, int] = field(default_factory=dict)  # kept consumer -> dropped producer (original indices)
    global_layers: list[int] = field(default_factory=list)  # new indices

    def columns(self, i: int, config) -> torch.Tensor:
        """Kept out_proj columns of layer ``i`` (ascending): SSM head-major, the same as attention's."""
        return (self.mamba_heads[i][:, None] * config.mamba_head_dim + self.mamba_channels[i][None, :]).flatten()


def make_plan(config, scores: Scores, target: PruneTarget) -> HymbaPrunePlan:
    shape, problems = mixer_shape(config, target)
    if problems:
        raise ValueError("; ".join(f"{k}: {v}" for k, v in problems.items()))
    hidden = target.hidden_size or config.hidden_size
    ffn = target.intermediate_size or config.intermediate_size
    layers = kept_layers(config, scores, target)
    kv_groups, promoted = regroup_kv(config, layers)
    plan = HymbaPrunePlan(hidden=_top(scores["hidden"], hidden), layers=layers, kv_groups=kv_groups,
                          promoted=promoted, global_layers=[layers.index(g) for g in sorted(config.global_attn_layers)])
    for i in layers:
        plan.ffn[i] = _top(scores[f"ffn.{i}"], ffn)
        if shape is None:  # the mixer stays whole
            plan.attention_heads[i] = torch.arange(config.num_attention_heads)
            plan.mamba_heads[i] = torch.arange(config.mamba_num_heads)
            plan.mamba_channels[i] = torch.arange(config.mamba_head_dim)
            plan.value_channels[i] = torch.arange(config.v_head_dim)
    if shape is not None:
        _plan_mixers(config, scores, shape, plan)
    return plan


def _plan_mixers(config, scores: Scores, shape: MixerShape, plan: HymbaPrunePlan) -> None:
    heads, P = config.num_attention_heads, config.mamba_head_dim
    r = config.mamba_num_heads // heads
    kept = set(plan.layers)
    for unit in kv_units(config):
        live = [i for i in unit if i in kept]
        if not live:
            continue
        # SSM channels as the paper (eq. 20): L2 over heads of the x-slice scores, then over the unit's layers.
        channel_score = torch.stack([scores[f"mamba.{i}"].norm(dim=0) for i in live]).norm(dim=0)  # (P,)
        channels = _top(channel_score, shape.channels)
        sub_score = torch.zeros(r)
        for i in live:
            grid = scores[f"hybrid.{i}"].view(heads, r, P)[:, :, channels]  # (heads, r, kept channels)
            # Hybrid heads on the kept channels (eq. 22's rule at out_proj's input), equal per cell.
            plan.attention_heads[i] = _top_per_group(grid.flatten(1).norm(dim=1), shape.head_cells,
                                                     shape.heads // shape.head_cells)
            sub_score += grid[plan.attention_heads[i]].pow(2).sum((0, 2))
        sub = _top_per_group(sub_score.sqrt(), shape.sub_segments, shape.sub_heads // shape.sub_segments)
        for i in live:
            plan.mamba_channels[i] = channels
            plan.mamba_heads[i] = (plan.attention_heads[i][:, None] * r + sub[None, :]).flatten()
            plan.value_channels[i] = (sub[:, None] * P + channels[None, :]).flatten()


def pruned_config(config, plan: HymbaPrunePlan):
    first = plan.layers[0]
    new = copy.deepcopy(config)
    new.hidden_size = len(plan.hidden)
    new.intermediate_size = len(plan.ffn[first])
    new.num_hidden_layers = len(plan.layers)
    new.global_attn_layers = list(plan.global_layers)
    new.kv_reuse_groups = [list(group) for group in plan.kv_groups]
    new.num_attention_heads = len(plan.attention_heads[first])
    new.mamba_num_heads = len(plan.mamba_heads[first])
    new.mamba_head_dim = len(plan.mamba_channels[first])
    new.v_head_dim = len(plan.value_channels[first])
    return new


# --------------------------------------------------------------------------------------
# Slicing
# --------------------------------------------------------------------------------------


def prune_state_dict(state: dict[str, torch.Tensor], config, plan: HymbaPrunePlan) -> dict[str, torch.Tensor]:
    """Slice every tensor of a HymbaForCausalLM state dict by ``plan``; layers are renumbered."""
    h, names = plan.hidden, _names(config)
    out = {"model.embed_tokens.weight": _cols(state["model.embed_tokens.weight"], h),
           f"{names.final_norm}.weight": _rows(state[f"{names.final_norm}.weight"], h)}
    for name in (names.meta_tokens, "lm_head.weight"):
        if name in state:
            out[name] = _cols(state[name], h)
    for new_i, i in enumerate(plan.layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{new_i}."
        for norm in ("input_layernorm", names.mlp_norm):
            out[f"{dst}{norm}.weight"] = _rows(state[f"{src}{norm}.weight"], h)
        keep, mlp = plan.ffn[i], f"{names.mlp}."
        for proj in ("gate_proj", "up_proj"):
            out[f"{dst}{mlp}{proj}.weight"] = _cols(_rows(state[f"{src}{mlp}{proj}.weight"], keep), h)
        out[f"{dst}{mlp}down_proj.weight"] = _cols(_rows(state[f"{src}{mlp}down_proj.weight"], h), keep)
        mixer = f"{names.mixer}."
        out.update({dst + mixer + k: v for k, v in _prune_mixer(state, config, plan, i, src + mixer).items()})
    return out


def _kv_rows(config, value_channels: torch.Tensor) -> torch.Tensor:
    """A producer's in_proj rows of its keys (all kept) and of ``value_channels`` of every value head."""
    offsets = _in_proj_offsets(config, owns_kv=True)
    kv, Dq, Dv = config.num_key_value_heads, config.head_dim, config.v_head_dim
    values = (torch.arange(kv)[:, None] * Dv + value_channels[None, :]).flatten()
    return torch.cat([offsets["k"] + torch.arange(kv * Dq), offsets["v"] + values])


def _prune_mixer(state, config, plan: HymbaPrunePlan, i: int, m: str) -> dict[str, torch.Tensor]:
    """The mixer of layer ``i`` (state-dict prefix ``m``): the attention part here, the SSM part by layout."""
    h, Dq, Dv = plan.hidden, config.head_dim, config.v_head_dim
    heads, columns = plan.attention_heads[i], plan.columns(i, config)
    # Exactness rests on this: the attention branch keeps the same out_proj columns as the SSM branch.
    assert torch.equal(columns, (heads[:, None] * Dv + plan.value_channels[i][None, :]).flatten())
    owns_kv = config.kv_producer(i) == i
    offsets = _in_proj_offsets(config, owns_kv)
    query_rows = offsets["q"] + (heads[:, None] * Dq + torch.arange(Dq)).flatten()
    weight = state[m + "in_proj.weight"]
    parts = [_cols(_rows(weight, query_rows), h)]
    if owns_kv:
        parts.append(_cols(_rows(weight, _kv_rows(config, plan.value_channels[i])), h))
    elif i in plan.promoted:  # now a producer: the dropped producer's k/v rows, read through this layer's norm
        producer = plan.promoted[i]
        w_producer = state[f"model.layers.{producer}.input_layernorm.weight"].float()
        w_self = state[f"model.layers.{i}.input_layernorm.weight"].float()
        scale = torch.where(w_self != 0, w_producer / torch.where(w_self != 0, w_self, 1), 0)
        source = state[m.replace(f"layers.{i}.", f"layers.{producer}.") + "in_proj.weight"]
        kv = _cols(_rows(source, _kv_rows(config, plan.value_channels[i])), h)  # the group's value channels
        parts.append((kv.float() * _rows(scale, h)[None, :]).to(kv.dtype))
    prune_ssm = _prune_mamba1 if _ssm_type(config) == "mamba1" else _prune_mamba2
    ssm_rows, out = prune_ssm(state, config, plan, i, m, offsets)
    parts.append(_cols(_rows(weight, ssm_rows), h))
    out["in_proj.weight"] = torch.cat(parts)
    out["out_proj.weight"] = _cols(_rows(state[m + "out_proj.weight"], h), columns)
    return out


def _prune_mamba2(state, config, plan: HymbaPrunePlan, i: int, m: str, offsets: dict[str, int]):
    """(in_proj rows after q | k | v, the other SSM-branch tensors) of a Mamba-2 hybrid mixer."""
    d, gn2 = config.mamba_num_heads * config.mamba_head_dim, 2 * config.n_groups * config.ssm_state_size
    ssm_heads, columns = plan.mamba_heads[i], plan.columns(i, config)
    rows = torch.cat([offsets["z"] + columns, offsets["x"] + columns, offsets["B"] + torch.arange(gn2),
                      offsets["dt"] + ssm_heads])
    conv_channels = torch.cat([columns, d + torch.arange(gn2)])  # x | B C
    out = {
        "attention.norm.weight": _rows(state[m + "attention.norm.weight"], columns),
        "ssm.conv1d.weight": _rows(state[m + "ssm.conv1d.weight"], conv_channels),
        "ssm.dt_bias": _rows(state[m + "ssm.dt_bias"], ssm_heads),
        "ssm.A_log": _rows(state[m + "ssm.A_log"], ssm_heads),
        "ssm.D": _rows(state[m + "ssm.D"], ssm_heads),
        "ssm.norm.weight": _rows(state[m + "ssm.norm.weight"], columns),
    }
    if m + "ssm.conv1d.bias" in state:
        out["ssm.conv1d.bias"] = _rows(state[m + "ssm.conv1d.bias"], conv_channels)
    return rows, out


def _prune_mamba1(state, config, plan: HymbaPrunePlan, i: int, m: str, offsets: dict[str, int]):
    """The same for the release's Mamba-1 mixer: every SSM tensor is per channel of d_inner (the
    kept columns), except x_proj's rows (Δ | B | C, computed from every kept channel) and the Δ/B/C
    norms, which stay whole."""
    columns = plan.columns(i, config)
    rows = torch.cat([offsets["x"] + columns, offsets["z"] + columns])
    out = {
        "pre_avg_layernorm1.weight": _rows(state[m + "pre_avg_layernorm1.weight"], columns),
        "pre_avg_layernorm2.weight": _rows(state[m + "pre_avg_layernorm2.weight"], columns),
        "conv1d.weight": _rows(state[m + "conv1d.weight"], columns),
        "x_proj.0.weight": _cols(state[m + "x_proj.0.weight"], columns),
        "dt_proj.0.weight": _rows(state[m + "dt_proj.0.weight"], columns),
        "dt_proj.0.bias": _rows(state[m + "dt_proj.0.bias"], columns),
        "A_log.0": _rows(state[m + "A_log.0"], columns),
        "D.0": _rows(state[m + "D.0"], columns),
    }
    if m + "conv1d.bias" in state:
        out["conv1d.bias"] = _rows(state[m + "conv1d.bias"], columns)
    for norm in ("dt_layernorm.weight", "B_layernorm.weight", "C_layernorm.weight"):
        if m + norm in state:
            out[norm] = state[m + norm].clone()
    return rows, out
