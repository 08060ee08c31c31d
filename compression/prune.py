"""Exact structured pruning of Nemotron-H (Minitron-SSM, group-aware).

From importance scores and a target, ``make_plan`` chooses what to keep on every axis and
``prune_state_dict`` slices every tensor accordingly; the result is a smaller
``NemotronHConfig`` plus weights that load into transformers' own class.

Mamba-2 mixer layout (docs/architectures.md 1.2), H heads of P channels, G groups,
state size N, d = H * P:

    in_proj.weight  rows  z[d] | x[d] | B[G*N] | C[G*N] | dt[H]     cols hidden
    conv1d          chans x[d] | B[G*N] | C[G*N]
    dt_bias, A_log, D                [H]
    norm.weight                      [d]   gated RMSNorm over G groups of d/G channels
    out_proj.weight                  [hidden, d]

Keeping heads S (equal count per group, each in its own group) and channels c of every head
keeps rows/channels ``h * P + c`` of z, x, the conv, the norm and out_proj's columns, plus
``dt[S]`` and the per-head scalars. B, C, the state size, the group count and the conv kernel
are never pruned: head h reads B/C of group h // (H / G), so a head may only move within its
group; keeping the same number per group keeps every head's group (and its gated-norm group).

Hymba (``model_type`` "hymba") has its own axes and slicing in compression/hymba.py; the entry
points here (``check_compressible``, ``target_problems``, ``score_problems``, ``make_plan``,
``pruned_config``, ``prune_state_dict``, ``prune``) dispatch to it by ``config.model_type``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compression.importance import Scores, layer_score, missing_layer_metric
from compression.spec import PruneTarget

PRUNABLE_LAYER_TYPES = {"linear_attention", "full_attention", "mlp"}
# Families importance and pruning cover (flows/recipe.py refuses a compress section for others).
COMPRESSIBLE_FAMILIES = {"nemotron_h", "hymba"}


def _hymba(config):
    """compression/hymba.py for a Hymba config, else None (Nemotron-H is this module)."""
    if getattr(config, "model_type", None) != "hymba":
        return None
    from compression import hymba

    return hymba


def check_compressible(config) -> None:
    """A clear error before any work for a model that importance and pruning do not cover."""
    if getattr(config, "model_type", None) not in COMPRESSIBLE_FAMILIES:
        raise ValueError(f"compression supports {sorted(COMPRESSIBLE_FAMILIES)} models; this one is "
                         f"{getattr(config, 'model_type', type(config).__name__)!r}")
    if (hymba := _hymba(config)) is not None and (problem := hymba.layout_problem(config)):
        raise ValueError(problem)


def layer_count(config) -> int:
    return config.num_hidden_layers if _hymba(config) else len(config.layers_block_type)


def droppable_layers(config, keep_attention: bool) -> list[int]:
    """Layers depth pruning may drop: Hymba's window layers (its global layers always stay);
    Nemotron-H's every layer, or every non-attention layer with ``keep_attention``."""
    if (hymba := _hymba(config)) is not None:
        return hymba.droppable_layers(config)
    return [i for i, kind in enumerate(config.layers_block_type) if not (keep_attention and kind == "full_attention")]


def target_problems(config, target: PruneTarget) -> dict[str, str]:
    """Field -> why ``target`` cannot be cut from a model with ``config``; empty when it can."""
    if (hymba := _hymba(config)) is not None:
        return hymba.target_problems(config, target)
    if getattr(config, "model_type", None) != "nemotron_h":
        return {"model": f"not a Nemotron-H model (model_type {getattr(config, 'model_type', None)!r}); "
                         f"compression supports {sorted(COMPRESSIBLE_FAMILIES)}"}
    unsupported = set(config.layers_block_type) - PRUNABLE_LAYER_TYPES
    if unsupported:
        return {"model": f"pruning layers of type {sorted(unsupported)} is not supported"}
    problems = {}
    for name in ("hidden_size", "intermediate_size", "num_attention_heads", "mamba_num_heads", "mamba_head_dim"):
        value, source = getattr(target, name), getattr(config, name)
        if value is not None and value > source:
            problems[name] = f"{value} is larger than the source model's {source}"
    if target.mamba_num_heads is not None and target.mamba_num_heads % config.n_groups:
        problems["mamba_num_heads"] = (
            f"must be a multiple of n_groups ({config.n_groups}) so every group keeps the same "
            f"number of heads, got {target.mamba_num_heads}"
        )
    if target.num_attention_heads is not None and target.num_attention_heads % config.num_key_value_heads:
        problems["num_attention_heads"] = (
            f"must be a multiple of num_key_value_heads ({config.num_key_value_heads}), "
            f"got {target.num_attention_heads}"
        )
    return problems | depth_problems(target, len(config.layers_block_type))


def depth_problems(target: PruneTarget, num_layers: int) -> dict[str, str]:
    """Why ``target``'s ``num_layers`` / ``drop_layers`` cannot be cut from ``num_layers`` layers."""
    problems = {}
    if target.num_layers is not None and target.num_layers > num_layers:
        problems["num_layers"] = f"{target.num_layers} is larger than the source model's {num_layers}"
    if target.drop_layers is not None:
        outside = [i for i in target.drop_layers if not 0 <= i < num_layers]
        if outside:
            problems["drop_layers"] = f"layers {outside} do not exist (the model has {num_layers}: 0..{num_layers - 1})"
        elif len(target.drop_layers) >= num_layers:
            problems["drop_layers"] = "would drop every layer"
    return problems


def score_problems(config, scores: Scores, layer_metric: str | None = None) -> list[str]:
    """Scores that do not fit this model (saved for another model, or incomplete); with
    ``layer_metric``, also scores that lack that depth score (``layer_mse`` is optional, as files
    saved before it existed lack it, and only ranking layers by ``mse`` needs it)."""
    problems = []
    if layer_metric is not None and (missing := missing_layer_metric(scores, layer_metric)) is not None:
        problems.append(missing)
    if "layer_mse" in scores:
        problems += _shape_problems({"layer_mse": (layer_count(config),)}, scores)
    if (hymba := _hymba(config)) is not None:
        return _shape_problems(hymba.score_shapes(config), scores) + problems
    expected = {"hidden": (config.hidden_size,), "layer_kl": (len(config.layers_block_type),),
                "layer_cosine": (len(config.layers_block_type),)}
    for i, kind in enumerate(config.layers_block_type):
        if kind == "mlp":
            expected[f"ffn.{i}"] = (config.intermediate_size,)
        elif kind == "full_attention":
            expected[f"attention.{i}"] = (config.num_attention_heads,)
        elif kind == "linear_attention":
            expected[f"mamba.{i}"] = (config.mamba_num_heads, config.mamba_head_dim)
    return _shape_problems(expected, scores) + problems


def _shape_problems(expected: dict[str, tuple[int, ...]], scores: Scores) -> list[str]:
    problems = []
    for key, shape in expected.items():
        if key not in scores:
            problems.append(f"missing scores for {key}")
        elif tuple(scores[key].shape) != shape:
            problems.append(f"scores for {key} have shape {tuple(scores[key].shape)}, the model needs {shape}")
    return problems


@dataclass
class PrunePlan:
    """Kept indices on every axis (sorted ascending, so keeping everything is the identity)."""

    hidden: torch.Tensor
    layers: list[int]  # original indices of the kept layers, in order
    ffn: dict[int, torch.Tensor] = field(default_factory=dict)  # by original layer index
    attention_heads: dict[int, torch.Tensor] = field(default_factory=dict)
    mamba_heads: dict[int, torch.Tensor] = field(default_factory=dict)
    mamba_channels: dict[int, torch.Tensor] = field(default_factory=dict)


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in ascending index order (stable for ties)."""
    order = torch.sort(score, descending=True, stable=True).indices
    return order[:k].sort().values


def _top_per_group(score: torch.Tensor, groups: int, per_group: int) -> torch.Tensor:
    """The top ``per_group`` of each of ``groups`` contiguous groups, concatenated in group order."""
    size = score.numel() // groups
    return torch.cat([g * size + _top(score[g * size : (g + 1) * size], per_group) for g in range(groups)])


def kept_layers(config, scores: Scores, target: PruneTarget) -> list[int]:
    num_layers = len(config.layers_block_type)
    if target.drop_layers is not None:
        return [i for i in range(num_layers) if i not in set(target.drop_layers)]
    if target.num_layers is not None:
        return _top(layer_score(scores, target.layer_metric), target.num_layers).tolist()
    return list(range(num_layers))


def make_plan(config, scores: Scores, target: PruneTarget) -> PrunePlan:
    if (hymba := _hymba(config)) is not None:
        return hymba.make_plan(config, scores, target)
    hidden = target.hidden_size or config.hidden_size
    ffn = target.intermediate_size or config.intermediate_size
    heads = target.num_attention_heads or config.num_attention_heads
    mamba_heads = target.mamba_num_heads or config.mamba_num_heads
    head_dim = target.mamba_head_dim or config.mamba_head_dim

    plan = PrunePlan(hidden=_top(scores["hidden"], hidden), layers=kept_layers(config, scores, target))
    for i in plan.layers:
        kind = config.layers_block_type[i]
        if kind == "mlp":
            plan.ffn[i] = _top(scores[f"ffn.{i}"], ffn)
        elif kind == "full_attention":
            kv = config.num_key_value_heads  # query heads kv*r .. kv*r + r-1 share KV head kv
            plan.attention_heads[i] = _top_per_group(scores[f"attention.{i}"], kv, heads // kv)
        elif kind == "linear_attention":
            head_channel = scores[f"mamba.{i}"]  # (H, P)
            channels = _top(head_channel.norm(dim=0), head_dim)  # L2 over heads; the same in every head
            head_score = head_channel[:, channels].norm(dim=1)  # (H,), on the kept channels only
            if target.mamba_head_selection == "group_aware":
                plan.mamba_heads[i] = _top_per_group(head_score, config.n_groups, mamba_heads // config.n_groups)
            else:  # global: winners keep their order and are regrouped by position
                plan.mamba_heads[i] = _top(head_score, mamba_heads)
            plan.mamba_channels[i] = channels
    return plan


def pruned_config(config, plan: PrunePlan):
    if (hymba := _hymba(config)) is not None:
        return hymba.pruned_config(config, plan)
    new = copy.deepcopy(config)
    new.hidden_size = len(plan.hidden)
    new.layers_block_type = [config.layers_block_type[i] for i in plan.layers]
    if plan.ffn:
        new.intermediate_size = len(next(iter(plan.ffn.values())))
    if plan.attention_heads:
        new.num_attention_heads = len(next(iter(plan.attention_heads.values())))
    if plan.mamba_heads:
        new.mamba_num_heads = len(next(iter(plan.mamba_heads.values())))
        new.mamba_head_dim = len(next(iter(plan.mamba_channels.values())))
    return new


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.index_select(0, idx.to(t.device))


def _cols(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.index_select(1, idx.to(t.device))


def prune_state_dict(state: dict[str, torch.Tensor], config, plan: PrunePlan) -> dict[str, torch.Tensor]:
    """Slice every tensor of a NemotronHForCausalLM (or HymbaForCausalLM) state dict by ``plan``;
    layers are renumbered."""
    if (hymba := _hymba(config)) is not None:
        return hymba.prune_state_dict(state, config, plan)
    h = plan.hidden
    out = {
        "model.embeddings.weight": _cols(state["model.embeddings.weight"], h),
        "model.norm_f.weight": _rows(state["model.norm_f.weight"], h),
        "lm_head.weight": _cols(state["lm_head.weight"], h),
    }
    for new_i, i in enumerate(plan.layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{new_i}."
        out[dst + "norm.weight"] = _rows(state[src + "norm.weight"], h)
        kind = config.layers_block_type[i]
        m = src + "mixer."
        if kind == "mlp":
            keep = plan.ffn[i]
            out[dst + "mixer.up_proj.weight"] = _cols(_rows(state[m + "up_proj.weight"], keep), h)
            out[dst + "mixer.down_proj.weight"] = _cols(_rows(state[m + "down_proj.weight"], h), keep)
            _copy_bias(state, out, m + "up_proj.bias", dst + "mixer.up_proj.bias", keep)
            _copy_bias(state, out, m + "down_proj.bias", dst + "mixer.down_proj.bias", h)
        elif kind == "full_attention":
            head_dim = config.head_dim
            keep = (plan.attention_heads[i][:, None] * head_dim + torch.arange(head_dim)).flatten()
            out[dst + "mixer.q_proj.weight"] = _cols(_rows(state[m + "q_proj.weight"], keep), h)
            out[dst + "mixer.k_proj.weight"] = _cols(state[m + "k_proj.weight"], h)
            out[dst + "mixer.v_proj.weight"] = _cols(state[m + "v_proj.weight"], h)
            out[dst + "mixer.o_proj.weight"] = _cols(_rows(state[m + "o_proj.weight"], h), keep)
        else:
            out.update({dst + "mixer." + k: v for k, v in _prune_mamba(state, m, config, plan, i).items()})
    return out


def _copy_bias(state, out, src_key, dst_key, keep):
    if src_key in state:
        out[dst_key] = _rows(state[src_key], keep)


def _prune_mamba(state, m: str, config, plan: PrunePlan, i: int) -> dict[str, torch.Tensor]:
    heads, channels = plan.mamba_heads[i], plan.mamba_channels[i]
    P, H = config.mamba_head_dim, config.mamba_num_heads
    d, bc = H * P, 2 * config.n_groups * config.ssm_state_size
    keep = (heads[:, None] * P + channels[None, :]).flatten()  # kept channels of d, head-major
    bc_rows = torch.arange(2 * d, 2 * d + bc)
    in_rows = torch.cat([keep, d + keep, bc_rows, 2 * d + bc + heads])  # z | x | B C | dt
    conv_channels = torch.cat([keep, torch.arange(d, d + bc)])  # x | B C
    h = plan.hidden
    out = {
        "in_proj.weight": _cols(_rows(state[m + "in_proj.weight"], in_rows), h),
        "conv1d.weight": _rows(state[m + "conv1d.weight"], conv_channels),
        "dt_bias": _rows(state[m + "dt_bias"], heads),
        "A_log": _rows(state[m + "A_log"], heads),
        "D": _rows(state[m + "D"], heads),
        "norm.weight": _rows(state[m + "norm.weight"], keep),
        "out_proj.weight": _cols(_rows(state[m + "out_proj.weight"], h), keep),
    }
    for name, idx in (("in_proj.bias", in_rows), ("conv1d.bias", conv_channels), ("out_proj.bias", h)):
        if m + name in state:
            out[name] = _rows(state[m + name], idx)
    return out


def prune(net, scores: Scores, target: PruneTarget):
    """A new, smaller model of ``net``'s class (NemotronHForCausalLM, HymbaForCausalLM) with sliced
    copies of ``net``'s weights, and its plan."""
    from model.architectures import get_family

    config = net.config
    problems = target_problems(config, target)
    if bad_scores := score_problems(config, scores, target.layer_metric if target.num_layers is not None else None):
        problems["scores"] = bad_scores[0]
    if problems:
        raise ValueError("; ".join(f"{k}: {v}" for k, v in problems.items()))
    plan = make_plan(config, scores, target)
    if not _hymba(config) and "full_attention" in config.layers_block_type and not plan.attention_heads:
        raise ValueError(f"layers: keeping {plan.layers} drops every attention layer; transformers' NemotronH "
                         "needs at least one to run with a cache (keep one with drop_layers or a larger num_layers)")
    new_config = pruned_config(config, plan)
    state = prune_state_dict(net.state_dict(), config, plan)
    with torch.device("meta"):
        student = get_family(config.model_type).model_class(new_config)
    student.load_state_dict(state, strict=True, assign=True)
    if getattr(new_config, "tie_word_embeddings", False):
        student.tie_weights()  # assign=True loaded the embedding and the LM head as two tensors
    return student.to(next(net.parameters()).dtype), plan


def prune_model(net, scores: Scores, target: PruneTarget):
    return prune(net, scores, target)[0]


# In a pruned checkpoint: target, teacher, kept layers and hidden channels (distillation's cosine term reads both).
PRUNING_FILE = "pruning.json"


def prune_checkpoint(teacher_dir: Path, out_dir: Path, scores: Scores, target: PruneTarget, provenance: dict) -> dict:
    """Prune a checkpoint folder into ``out_dir`` (config, safetensors, tokenizer, pruning.json);
    returns the student's architecture summary."""
    from model.architectures import get_family, load_pretrained

    net, tokenizer = load_pretrained(teacher_dir)  # in its saved dtype: slicing is exact in any
    student, plan = prune(net, scores, target)
    out_dir.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    summary = get_family(student.config.model_type).summarize(student.config)
    record = provenance | {"target": target.model_dump(mode="json", exclude_none=True),
                           "kept_layers": plan.layers,
                           **({"promoted_kv_producers": {str(k): v for k, v in plan.promoted.items()}}
                              if getattr(plan, "promoted", None) else {}),
                           "kept_hidden_channels": plan.hidden.tolist(),
                           "teacher_parameters": sum(p.numel() for p in net.parameters()),
                           "student_parameters": summary["parameters"]}
    (out_dir / PRUNING_FILE).write_text(json.dumps(record, indent=1))
    return summary
