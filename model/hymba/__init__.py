"""Hymba in the factory: presets, config building and checks, summaries, and the Auto classes.

The model itself is ``modeling_hymba.py`` / ``configuration_hymba.py``: self-contained
files (torch and transformers only) that ``save_pretrained`` copies next to the weights, so
a checkpoint loads elsewhere with ``trust_remote_code=True``. Importing this package
registers them with ``AutoConfig`` / ``AutoModelForCausalLM``, so inside the project a
checkpoint loads with plain ``AutoModelForCausalLM.from_pretrained(folder)``.

Layer patterns use one letter per layer: ``G`` global attention, ``W`` sliding window;
lower case for a KV consumer (it reuses the K/V of the layer before it). Every layer also
has SSM heads and an FFN. ``ssm_type: mamba1`` is the release's layout (Mamba-1 channels and
the release's parameter names), in which nvidia/Hymba-1.5B-Base's checkpoint loads as it is.

Compression (``compression/hymba.py``, docs/compression.md 7) cuts hidden size (embedding,
every RMSNorm, in_proj columns, out_proj rows, FFN), FFN neurons, hybrid heads (a query head
with the SSM heads under its out_proj columns: the branches are averaged into one out_proj,
so both keep the same columns), sub-heads and SSM channels, and layers (the global-attention
layers are kept; a dropped KV producer's first consumer is promoted). Meta tokens and KV heads
are kept. With ``ssm_type: mamba1`` the SSM axis is channels of d_inner (A, Δ, D and the conv
are per channel; B and C are shared), not heads.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from model.hymba.configuration_hymba import LEGACY_NAMES, HymbaConfig, config_problems
from model.hymba.modeling_hymba import HymbaCache, HymbaForCausalLM

AutoConfig.register("hymba", HymbaConfig, exist_ok=True)
AutoModelForCausalLM.register(HymbaConfig, HymbaForCausalLM, exist_ok=True)
# save_pretrained writes auto_map and copies the two files into the checkpoint folder.
HymbaConfig.register_for_auto_class()
HymbaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

PRESETS: dict[str, dict] = {
    # The published shape (docs/architectures.md, section 2.1) with Mamba-2 heads of the same width
    # (d_inner 3200 = 50 heads x 64, state 16) in 5 groups; globals [0, 15, 31] and the
    # published KV groups are the config's defaults for 32 layers. ~1.5B parameters.
    "hymba-1.5b": dict(
        vocab_size=32001, hidden_size=1600, intermediate_size=5504, num_hidden_layers=32,
        num_attention_heads=25, num_key_value_heads=5, head_dim=64, v_head_dim=128,
        mamba_num_heads=50, mamba_head_dim=64, n_groups=5, ssm_state_size=16, conv_kernel=4,
        chunk_size=128, num_meta_tokens=128, sliding_window=1024, max_position_embeddings=8192,
    ),
    # ~6.2M parameters, like the Nemotron-H tiny preset: 7 layers GWwGWwG (globals 0, 3, 6;
    # KV pairs (1, 2) and (4, 5)), 8 SSM heads in 4 groups, 16 meta tokens, window 64.
    "tiny": dict(
        vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=7,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, v_head_dim=64,
        mamba_num_heads=8, mamba_head_dim=32, n_groups=4, ssm_state_size=16, conv_kernel=4,
        chunk_size=32, num_meta_tokens=16, sliding_window=64, max_position_embeddings=4096,
    ),
    # For unit tests, every feature in ~0.3M parameters: 6 layers GWGWwG (globals 0, 2, 5; a
    # single window layer 1 and the KV pair (3, 4)), 2 SSM groups of 2 heads, 4 meta tokens, window 8.
    "micro": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, v_head_dim=16,
        mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=8, conv_kernel=4,
        chunk_size=16, num_meta_tokens=4, sliding_window=8, max_position_embeddings=1024,
    ),
}

CONFIG_FIELDS = {f.name for f in dataclasses.fields(HymbaConfig)} | set(LEGACY_NAMES)


def build_config(preset: str, overrides: dict | None = None, **special_tokens) -> HymbaConfig:
    """A ``HymbaConfig`` from a preset name and per-field overrides; ``special_tokens``
    (``pad_token_id`` etc.) come from the tokenizer."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = dict(PRESETS[preset]) | dict(overrides or {})
    unknown = set(fields) - CONFIG_FIELDS
    if unknown:
        raise ValueError(f"not HymbaConfig fields: {sorted(unknown)}")
    return HymbaConfig(**fields, **special_tokens)


def in_proj_rows(config: HymbaConfig, owns_kv: bool = True) -> dict[str, int]:
    """Rows of a layer's in_proj by part, in order: q | k | v | z | x | B | C | dt for Mamba-2,
    q | k | v | x | z for Mamba-1 (its B, C and Δ come from x_proj)."""
    d_inner = config.mamba_num_heads * config.mamba_head_dim
    gn = config.n_groups * config.ssm_state_size
    kv = config.num_key_value_heads if owns_kv else 0
    attention = {"q": config.num_attention_heads * config.head_dim, "k": kv * config.head_dim,
                 "v": kv * config.v_head_dim}
    if config.ssm_type == "mamba1":
        return attention | {"x": d_inner, "z": d_inner}
    return attention | {"z": d_inner, "x": d_inner, "B": gn, "C": gn, "dt": config.mamba_num_heads}


def parameters_by_kind(config: HymbaConfig) -> dict[str, int]:
    """Parameter counts as embedding, meta_tokens, attention, ssm, fusion (the out_proj both
    branches share), ffn, norm, lm_head (absent when tied). Built on the meta device. The branch
    norms count with their branch (Mamba-1: pre_avg_layernorm1 attention, the rest of ``mamba`` ssm)."""
    with torch.device("meta"):
        model = HymbaForCausalLM(config)
    kinds = dict.fromkeys(("embedding", "meta_tokens", "attention", "ssm", "fusion", "ffn", "norm", "lm_head"), 0)
    for name, param in model.named_parameters():
        parts = name.split(".")
        if name.endswith("in_proj.weight"):
            layer = int(parts[parts.index("layers") + 1])
            rows = in_proj_rows(config, owns_kv=config.kv_producer(layer) == layer)
            attention = rows.pop("q") + rows.pop("k") + rows.pop("v")
            kinds["attention"] += attention * config.hidden_size
            kinds["ssm"] += sum(rows.values()) * config.hidden_size
            continue
        names = set(parts)
        kind = ("embedding" if "embed_tokens" in names
                else "meta_tokens" if names & {"meta_tokens", "memory_tokens"}
                else "lm_head" if parts[0] == "lm_head"
                else "attention" if names & {"attention", "pre_avg_layernorm1"}
                else "fusion" if "out_proj" in names
                else "ssm" if names & {"ssm", "mamba"}
                else "ffn" if names & {"mlp", "moe"} else "norm")
        kinds[kind] += param.numel()
    return {k: v for k, v in kinds.items() if v}


def summarize(config: HymbaConfig) -> dict:
    """What a ModelRef's ``architecture`` records: family, size, layer pattern, key widths."""
    by_kind = parameters_by_kind(config)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "v_head_dim", "ssm_type", "mamba_num_heads", "mamba_head_dim", "n_groups",
            "ssm_state_size", "num_meta_tokens", "sliding_window", "vocab_size")
    return dict(family="hymba", parameters=sum(by_kind.values()), parameters_by_kind=by_kind,
                layer_pattern=config.layer_pattern, config={k: getattr(config, k) for k in keys})


def cache_bytes(config: HymbaConfig, context_length: int, kv_bytes: float = 2, state_bytes: float = 4,
                conv_bytes: float | None = None) -> float:
    """Bytes of one sequence's decoding cache after ``context_length`` tokens, as HymbaCache
    holds it: K/V of KV-producing layers only (window layers: meta tokens + the last W-1
    positions), the conv inputs (``conv_bytes`` each, default ``kv_bytes``; x | B | C for Mamba-2,
    x alone for Mamba-1) and the SSM state (``state_bytes``; d_inner x N for either). Each part is
    linear in its byte width, so a width of 0 leaves that part out."""
    conv_bytes = kv_bytes if conv_bytes is None else conv_bytes
    per_position = config.num_key_value_heads * (config.head_dim + config.v_head_dim) * kv_bytes
    conv_dim = config.mamba_num_heads * config.mamba_head_dim
    if config.ssm_type == "mamba2":
        conv_dim += 2 * config.n_groups * config.ssm_state_size
    ssm_state = config.mamba_num_heads * config.mamba_head_dim * config.ssm_state_size
    total = 0
    for layer in range(config.num_hidden_layers):
        if config.kv_producer(layer) == layer:
            window = config.layer_window(layer)
            kept = context_length if window is None else min(context_length, window - 1)
            total += (config.num_meta_tokens + kept) * per_position
        total += conv_dim * (config.conv_kernel - 1) * conv_bytes + ssm_state * state_bytes
    return total


__all__ = ["PRESETS", "CONFIG_FIELDS", "HymbaCache", "HymbaConfig", "HymbaForCausalLM", "build_config",
           "cache_bytes", "config_problems", "parameters_by_kind", "summarize"]
