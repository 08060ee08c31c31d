"""The cost model for architecture search: parameters, and memory at inference.

    memory = weights + attention KV cache + Mamba state
    KV cache    = attention layers x 2 (K, V) x KV heads x head_dim x context x batch x dtype bytes
    Mamba state = Mamba layers x batch x (conv_dim x conv_kernel x dtype bytes      (conv state)
                                          + heads x head_dim x state x ssm bytes)   (SSM state, fp32)
    conv_dim    = heads x head_dim + 2 x groups x state

These are the shapes transformers allocates for NemotronH in ``generate()``: per attention
layer keys and values (batch, KV heads, context, head_dim); per Mamba layer
``conv_states`` (batch, conv_dim, conv_kernel) in the model dtype and ``recurrent_states``
(batch, heads, head_dim, state) in ``mamba_ssm_cache_dtype`` (float32 by default).
tests/test_budget.py checks the formulas against those tensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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

    def as_dict(self) -> dict[str, float]:
        return asdict(self) | {"cache": self.cache, "total": self.total}


def _count(config, layer_type: str) -> int:
    return sum(1 for t in config.layers_block_type if t == layer_type)


def kv_cache_bytes(config, context: int, batch: int, dtype="bfloat16") -> float:
    return (_count(config, "full_attention") * 2 * config.num_key_value_heads * config.head_dim
            * context * batch * dtype_bytes(dtype))


def mamba_state_bytes(config, batch: int, dtype="bfloat16", ssm_dtype=None) -> tuple[float, float]:
    """(conv state, SSM state) bytes over all Mamba layers; neither grows with the context."""
    layers = _count(config, "linear_attention")
    d_inner = config.mamba_num_heads * config.mamba_head_dim
    conv_dim = d_inner + 2 * config.n_groups * config.ssm_state_size
    conv = layers * batch * conv_dim * config.conv_kernel * dtype_bytes(dtype)
    ssm = (layers * batch * config.mamba_num_heads * config.mamba_head_dim * config.ssm_state_size
           * dtype_bytes(ssm_dtype or config.mamba_ssm_cache_dtype))
    return conv, ssm


def inference_memory(config, parameters: int, context: int, batch: int = 1, dtype="bfloat16",
                     ssm_dtype=None) -> InferenceMemory:
    conv, ssm = mamba_state_bytes(config, batch, dtype, ssm_dtype)
    return InferenceMemory(weights=parameters * dtype_bytes(dtype), kv_cache=kv_cache_bytes(config, context, batch, dtype),
                           conv_state=conv, ssm_state=ssm)
