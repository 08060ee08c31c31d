"""Nemotron-H through transformers' native ``NemotronHConfig`` / ``NemotronHForCausalLM``.

Presets carry the published shapes (docs/architectures.md, section 1.1) and tiny CPU
shapes. A preset plus per-field overrides gives a ``NemotronHConfig``; the model class is
transformers' own, so every checkpoint the factory writes loads with plain
``AutoModelForCausalLM.from_pretrained``. On CUDA with ``mamba-ssm`` and ``causal-conv1d``
installed transformers picks the fused kernels by itself; elsewhere it runs its PyTorch path.

Layer patterns use the published one-character code: ``M`` Mamba-2, ``*`` attention,
``-`` FFN (squared-ReLU MLP).
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import NemotronHConfig, NemotronHForCausalLM

PATTERN_TO_LAYER_TYPE = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
LAYER_TYPE_TO_PATTERN = {v: k for k, v in PATTERN_TO_LAYER_TYPE.items()}
# transformers is mid-rename (docs/architectures.md, section 1.3): accept the legacy names too.
LAYER_TYPE_TO_PATTERN |= {"mamba": "M", "attention": "*"}

_PATTERN_8B = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
_PATTERN_56B = (
    "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-"
    "M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
)
_PATTERN_47B = "M-M-M-M-M-M-M-M-M*-M-M-M-M-M-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-M-M---MM---M-M*-M-M-M-M-M-"

# Shared by every published Nemotron-H shape (docs/architectures.md 1.1): no biases, RMSNorm 1e-5,
# squared-ReLU FFN, conv kernel 4, chunk 128, NoPE GQA with head_dim 128.
_PUBLISHED_COMMON = dict(
    vocab_size=131072,
    num_key_value_heads=8,
    head_dim=128,
    mamba_head_dim=64,
    n_groups=8,
    conv_kernel=4,
    chunk_size=128,
    max_position_embeddings=8192,
)

PRESETS: dict[str, dict] = {
    "nemotron-h-4b": dict(
        _PUBLISHED_COMMON,
        pattern=_PATTERN_8B,
        hidden_size=3072,
        intermediate_size=12288,
        num_attention_heads=32,
        mamba_num_heads=112,
        ssm_state_size=128,
    ),
    "nemotron-h-8b": dict(
        _PUBLISHED_COMMON,
        pattern=_PATTERN_8B,
        hidden_size=4096,
        intermediate_size=21504,
        num_attention_heads=32,
        mamba_num_heads=128,
        ssm_state_size=128,
    ),
    "nemotron-h-47b": dict(
        _PUBLISHED_COMMON,
        pattern=_PATTERN_47B,
        hidden_size=8192,
        intermediate_size=30720,
        num_attention_heads=64,
        mamba_num_heads=256,
        ssm_state_size=256,
    ),
    "nemotron-h-56b": dict(
        _PUBLISHED_COMMON,
        pattern=_PATTERN_56B,
        hidden_size=8192,
        intermediate_size=32768,
        num_attention_heads=64,
        mamba_num_heads=256,
        ssm_state_size=256,
    ),
    # ~6M parameters: 4 Mamba, 4 FFN, 1 attention layer, 8 Mamba groups of 2 heads as in the
    # published models' group count. A 2-core CPU trains it at ~3k tokens/s.
    "tiny": dict(
        pattern="M-M*-M-M-",
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=1024,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        mamba_num_heads=16,
        mamba_head_dim=32,
        n_groups=8,
        ssm_state_size=16,
        conv_kernel=4,
        chunk_size=32,
        max_position_embeddings=4096,
    ),
    # For unit tests: a few hundred thousand parameters, every layer type, 4 groups.
    "micro": dict(
        pattern="M-*M-",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        mamba_num_heads=8,
        mamba_head_dim=8,
        n_groups=4,
        ssm_state_size=8,
        conv_kernel=4,
        chunk_size=16,
        max_position_embeddings=1024,
    ),
}

# The same depth with 4 heads per group, so heads can be cut by 25% and 50% group-aware.
PRESETS["tiny-4hpg"] = dict(PRESETS["tiny"], mamba_num_heads=32, mamba_head_dim=16)

# Fields a recipe may override: the preset keys plus every NemotronHConfig field.
CONFIG_FIELDS = {f.name for f in dataclasses.fields(NemotronHConfig)} | {"pattern"}


def pattern_of(config: NemotronHConfig) -> str:
    return "".join(LAYER_TYPE_TO_PATTERN[t] for t in config.layers_block_type)


def build_config(preset: str, overrides: dict | None = None, **special_tokens) -> NemotronHConfig:
    """A ``NemotronHConfig`` from a preset name and per-field overrides.

    ``pattern`` is the one-character layer code; ``special_tokens`` (``pad_token_id`` etc.)
    come from the tokenizer so generation stops at the right token.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = dict(PRESETS[preset]) | dict(overrides or {})
    unknown = set(fields) - CONFIG_FIELDS
    if unknown:
        raise ValueError(f"not NemotronHConfig fields: {sorted(unknown)}")
    pattern = fields.pop("pattern")
    bad = set(pattern) - set(PATTERN_TO_LAYER_TYPE)
    if bad:
        raise ValueError(f"pattern {pattern!r} has unknown layer codes {sorted(bad)}; use M, *, - or E")
    fields["layers_block_type"] = [PATTERN_TO_LAYER_TYPE[c] for c in pattern]
    return NemotronHConfig(**fields, **special_tokens)


def config_problems(config: NemotronHConfig) -> dict[str, str]:
    """Field -> what is wrong, for shapes that transformers would build but cannot run."""
    problems = {}
    for name in ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "mamba_num_heads", "mamba_head_dim",
                 "n_groups", "ssm_state_size", "conv_kernel", "chunk_size"):
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            problems[name] = f"must be a positive integer, got {value!r}"
    if problems:
        return problems
    if config.mamba_num_heads % config.n_groups:
        problems["mamba_num_heads"] = (
            f"must be a multiple of n_groups ({config.n_groups}), got {config.mamba_num_heads}"
        )
    if config.num_attention_heads % config.num_key_value_heads:
        problems["num_attention_heads"] = (
            f"must be a multiple of num_key_value_heads ({config.num_key_value_heads}), "
            f"got {config.num_attention_heads}"
        )
    if "full_attention" not in config.layers_block_type:
        # transformers' NemotronH asks an attention layer's cache for the sequence length.
        problems["pattern"] = "needs at least one attention layer (*)"
    return problems


def parameters_by_kind(config: NemotronHConfig) -> dict[str, int]:
    """Parameter counts grouped as embedding, mamba, attention, ffn, norm, lm_head.

    Counted from the config by the shapes transformers builds (tests check it against a
    model built on the meta device), so it is instant even for the 56B shape and cheap
    enough to run for every candidate of an architecture search.
    """
    h, vocab = config.hidden_size, config.vocab_size
    d_inner = config.mamba_num_heads * config.mamba_head_dim
    bc = 2 * config.n_groups * config.ssm_state_size
    conv_dim = d_inner + bc
    per_layer = {
        "linear_attention": (
            h * (2 * d_inner + bc + config.mamba_num_heads) + config.use_bias * (2 * d_inner + bc + config.mamba_num_heads)
            + conv_dim * config.conv_kernel + config.use_conv_bias * conv_dim
            + 3 * config.mamba_num_heads + d_inner + d_inner * h + config.use_bias * h
        ),
        # transformers builds q/k/v/o without bias whatever attention_bias says
        "full_attention": 2 * h * (config.num_attention_heads + config.num_key_value_heads) * config.head_dim,
        "mlp": 2 * h * config.intermediate_size + config.mlp_bias * (config.intermediate_size + h),
    }
    kind_of = {"linear_attention": "mamba", "full_attention": "attention", "mlp": "ffn"}
    unsupported = set(config.layers_block_type) - set(per_layer)
    if unsupported:
        raise ValueError(f"parameter counting does not cover layer types {sorted(unsupported)}")
    kinds = {"embedding": vocab * h, "mamba": 0, "attention": 0, "ffn": 0,
             # NemotronH declares no tied weights: lm_head is its own matrix even with tie_word_embeddings
             "norm": h * (len(config.layers_block_type) + 1), "lm_head": vocab * h}
    for layer_type in config.layers_block_type:
        kinds[kind_of[layer_type]] += per_layer[layer_type]
    return {k: v for k, v in kinds.items() if v}


def parameters_by_kind_built(config: NemotronHConfig) -> dict[str, int]:
    """The same counts read off a model built on the meta device (the reference for the above)."""
    with torch.device("meta"):
        model = NemotronHForCausalLM(config)
    kinds = {"embedding": 0, "mamba": 0, "attention": 0, "ffn": 0, "moe": 0, "norm": 0, "lm_head": 0}
    layer_kind = {"M": "mamba", "*": "attention", "-": "ffn", "E": "moe"}
    pattern = pattern_of(config)
    for name, param in model.named_parameters():
        parts = name.split(".")
        if "embeddings" in parts:
            kind = "embedding"
        elif parts[0] == "lm_head":
            kind = "lm_head"
        elif "mixer" in parts:
            kind = layer_kind[pattern[int(parts[parts.index("layers") + 1])]]
        else:
            kind = "norm"
        kinds[kind] += param.numel()
    return {k: v for k, v in kinds.items() if v}


def summarize(config: NemotronHConfig) -> dict:
    """What a ModelRef's ``architecture`` records: family, size, pattern, key widths."""
    by_kind = parameters_by_kind(config)
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "head_dim", "mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size", "vocab_size")
    return dict(
        family="nemotron_h",
        parameters=sum(by_kind.values()),
        parameters_by_kind=by_kind,
        layer_pattern=pattern_of(config),
        config={k: getattr(config, k) for k in keys},
    )
