"""The cost model: memory at inference, from a config alone (parameters: each family's
``parameters_by_kind``). The architecture search budgets with it and evaluation checks the
caches it measures against it.

    memory = weights + attention KV cache + Mamba state   (each part in its own dtype, default one)
    KV cache    = attention layers x 2 (K, V) x KV heads x head_dim x context x batch x dtype bytes
    Mamba state = Mamba layers x batch x (conv_dim x conv_kernel x dtype bytes      (conv state)
                                          + heads x head_dim x state x ssm bytes)   (SSM state, fp32)
    conv_dim    = heads x head_dim + 2 x groups x state

These are the shapes transformers allocates for NemotronH in ``generate()``: per attention
layer keys and values (batch, KV heads, context, head_dim); per Mamba layer
``conv_states`` (batch, conv_dim, conv_kernel) in the model dtype and ``recurrent_states``
(batch, heads, head_dim, state) in ``mamba_ssm_cache_dtype`` (float32 by default).
tests/test_compress.py checks the formulas against those tensors. A plain decoder
(``ATTENTION_ONLY_TYPES``) counts as all attention layers; other families (Hymba: windows,
shared K/V, meta tokens) are not modelled here (``layer_types`` returns None).
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "fp8": 1.0, "fp4": 0.5}


def dtype_bytes(dtype) -> float:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


@dataclass(frozen=True)
class InferenceMemory:
    """Bytes needed to serve ``batch`` sequences of ``context`` tokens."""

    weights: float
    kv_cache: float
    conv_state: float
    ssm_state: float

    @property
    def cache(self) -> float:
        return self.kv_cache + self.conv_state + self.ssm_state

    @property
    def total(self) -> float:
        return self.weights + self.cache

ATTENTION_ONLY_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo2"}
_LEGACY = {"attention": "full_attention", "mamba": "linear_attention"}


def layer_types(config) -> list[str] | None:
    """Each layer's type (``full_attention``, ``linear_attention``, ``mlp``...), or None when
    the family's cache is not modelled by these formulas."""
    types = getattr(config, "layers_block_type", None)
    if types is not None:
        return [_LEGACY.get(t, t) for t in types]
    if getattr(config, "model_type", None) in ATTENTION_ONLY_TYPES:
        return ["full_attention"] * config.num_hidden_layers
    return None


def _count(config, layer_type: str) -> int:
    return sum(1 for t in layer_types(config) or () if t == layer_type)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_cache_bytes(config, context: int, batch: int, dtype="bfloat16") -> float:
    return (_count(config, "full_attention") * 2 * config.num_key_value_heads * _head_dim(config)
            * context * batch * dtype_bytes(dtype))


def mamba_state_bytes(config, batch: int, dtype="bfloat16", ssm_dtype=None) -> tuple[float, float]:
    """(conv state, SSM state) bytes over all Mamba layers; neither grows with the context."""
    layers = _count(config, "linear_attention")
    if not layers:
        return 0.0, 0.0
    d_inner = config.mamba_num_heads * config.mamba_head_dim
    conv_dim = d_inner + 2 * config.n_groups * config.ssm_state_size
    conv = layers * batch * conv_dim * config.conv_kernel * dtype_bytes(dtype)
    ssm = (layers * batch * config.mamba_num_heads * config.mamba_head_dim * config.ssm_state_size
           * dtype_bytes(ssm_dtype or config.mamba_ssm_cache_dtype))
    return conv, ssm


def inference_memory(config, parameters: int, context: int, batch: int = 1, dtype="bfloat16",
                     ssm_dtype=None, *, weights_dtype=None, kv_cache_dtype=None, conv_dtype=None) -> InferenceMemory:
    """Weights, KV cache and Mamba state of ``batch`` sequences of ``context`` tokens. Each part
    has its own number format: ``weights_dtype``, ``kv_cache_dtype`` and ``conv_dtype`` default to
    ``dtype`` (FP4 weights with a bfloat16 or FP8 cache are different budgets); ``ssm_dtype`` to the
    config's ``mamba_ssm_cache_dtype``."""
    conv, ssm = mamba_state_bytes(config, batch, conv_dtype or dtype, ssm_dtype)
    return InferenceMemory(weights=parameters * dtype_bytes(weights_dtype or dtype),
                           kv_cache=kv_cache_bytes(config, context, batch, kv_cache_dtype or dtype),
                           conv_state=conv, ssm_state=ssm)
