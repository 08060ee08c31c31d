"""Hymba configuration (Dong et al., "Hymba: A Hybrid-head Architecture for Small Language
Models", arXiv 2411.13676; nvidia/Hymba-1.5B-Base).

The defaults are the published 1.5B shape, with one deliberate difference: the SSM heads are
Mamba-2 (SSD) heads with ``n_groups`` B/C groups, where the release used Mamba-1. The SSM
width is the published one (d_inner 3200 = 50 heads x 64) and so is its state size (16).

This file is copied next to the weights of every checkpoint saved by the factory (the
config's ``auto_map``), so it imports nothing but transformers.
"""

from transformers import PretrainedConfig


class HymbaConfig(PretrainedConfig):
    r"""
    Args:
        vocab_size (`int`, *optional*, defaults to 32001):
            Vocabulary size (rows of the embedding; the LM head is tied to it by default).
        hidden_size (`int`, *optional*, defaults to 1600):
            Width of the residual stream.
        intermediate_size (`int`, *optional*, defaults to 5504):
            Width of the SwiGLU FFN that follows every hybrid-head mixer.
        num_hidden_layers (`int`, *optional*, defaults to 32):
            Number of layers; each is a hybrid-head mixer followed by an FFN.
        num_attention_heads (`int`, *optional*, defaults to 25):
            Query heads per layer.
        num_key_value_heads (`int`, *optional*, defaults to 5):
            Key/value heads (GQA); `num_attention_heads` must be a multiple of it.
        head_dim (`int`, *optional*, defaults to 64):
            Width of a query/key head (even: RoPE rotates pairs of channels).
        v_head_dim (`int`, *optional*, defaults to 128):
            Width of a value head. The attention output (`num_attention_heads * v_head_dim`) is
            averaged with the SSM output (`mamba_num_heads * mamba_head_dim`), so the two must match.
        mamba_num_heads (`int`, *optional*, defaults to 50):
            SSM (Mamba-2) heads per layer; a multiple of `n_groups`.
        mamba_head_dim (`int`, *optional*, defaults to 64):
            Channels per SSM head.
        n_groups (`int`, *optional*, defaults to 5):
            Groups of SSM heads sharing B and C; heads are contiguous per group.
        ssm_state_size (`int`, *optional*, defaults to 16):
            State size N of every SSM head.
        conv_kernel (`int`, *optional*, defaults to 4):
            Width of the causal depthwise convolution over the SSM inputs (x, B, C).
        chunk_size (`int`, *optional*, defaults to 128):
            Chunk length of the chunked SSD scan.
        use_conv_bias (`bool`, *optional*, defaults to `True`):
            Whether the SSM convolution has a bias.
        time_step_min (`float`, *optional*, defaults to 0.001):
            Lower end of the log-uniform range the SSM step size Δ is initialised in.
        time_step_max (`float`, *optional*, defaults to 0.1):
            Upper end of that range.
        time_step_floor (`float`, *optional*, defaults to 1e-4):
            Smallest initial Δ.
        time_step_limit (`list[float]`, *optional*, defaults to `[0.0, inf]`):
            Δ is clamped to this range at run time (the fused kernels' `dt_limit`).
        num_meta_tokens (`int`, *optional*, defaults to 128):
            Learnable vectors prepended once per sequence; every token of every layer sees them.
        sliding_window (`int`, *optional*, defaults to 1024):
            On window layers a token attends to the meta tokens and to the last `sliding_window`
            positions, itself included.
        global_attn_layers (`list[int]`, *optional*):
            Layers with global (full causal) attention; all others use the window. Defaults to the
            first, middle (`(num_hidden_layers - 1) // 2`) and last layer, as published ([0, 15, 31]).
        kv_reuse_groups (`list[list[int]]`, *optional*):
            Groups of consecutive layers that share one K/V: the first layer of a group (the
            producer) computes K and V, the others (consumers) compute only queries and reuse
            the producer's post-RoPE K and V. Defaults to pairing consecutive window layers
            between the global ones (an odd run starts with a triple), which gives the published
            groups for 32 layers. `[]` disables sharing.
        rope_theta (`float`, *optional*, defaults to 10000.0):
            RoPE base.
        max_position_embeddings (`int`, *optional*, defaults to 8192):
            The context length the model is meant for (meta tokens not counted).
        rms_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of every RMSNorm.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the initial weights.
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            Whether the LM head reuses the embedding matrix.
        use_cache (`bool`, *optional*, defaults to `True`):
            Whether a forward pass in eval mode returns a `HymbaCache` for decoding.
        use_mamba_kernels (`bool`, *optional*, defaults to `True`):
            Use the fused `mamba_ssm` / `causal_conv1d` kernels when they import and the weights
            are on CUDA; the PyTorch path runs otherwise.

    Legacy names from the published `config.json` are accepted: `num_memory_tokens`,
    `global_attn_idx`, `kv_reuse_group`, `mamba_d_state`, `mamba_d_conv`.

    ```python
    >>> config = HymbaConfig(hidden_size=256, num_hidden_layers=7)  # global 0, 3, 6; KV pairs (1, 2), (4, 5)
    ```
    """

    model_type = "hymba"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32001
    hidden_size: int = 1600
    intermediate_size: int = 5504
    num_hidden_layers: int = 32
    num_attention_heads: int = 25
    num_key_value_heads: int = 5
    head_dim: int = 64
    v_head_dim: int = 128
    mamba_num_heads: int = 50
    mamba_head_dim: int = 64
    n_groups: int = 5
    ssm_state_size: int = 16
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: list[float] | None = None
    num_meta_tokens: int = 128
    sliding_window: int = 1024
    global_attn_layers: list[int] | None = None
    kv_reuse_groups: list[list[int]] | None = None
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = True
    use_mamba_kernels: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        # The names of the published config.json (nvidia/Hymba-1.5B-Base), in one place.
        for legacy, name in (("num_memory_tokens", "num_meta_tokens"), ("global_attn_idx", "global_attn_layers"),
                             ("kv_reuse_group", "kv_reuse_groups"), ("mamba_d_state", "ssm_state_size"),
                             ("mamba_d_conv", "conv_kernel")):
            if legacy in kwargs:
                setattr(self, name, kwargs.pop(legacy))
        if self.time_step_limit is None:
            self.time_step_limit = [0.0, float("inf")]
        if self.global_attn_layers is None:
            self.global_attn_layers = default_global_layers(self.num_hidden_layers)
        if self.kv_reuse_groups is None:
            self.kv_reuse_groups = default_kv_groups(self.num_hidden_layers, self.global_attn_layers)
        super().__post_init__(**kwargs)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of ``layer``, None for a global-attention layer."""
        return None if layer in self.global_attn_layers else self.sliding_window

    def kv_producer(self, layer: int) -> int:
        """The layer whose K/V ``layer`` attends with: itself, or the first layer of its group."""
        for group in self.kv_reuse_groups:
            if layer in group:
                return group[0]
        return layer

    @property
    def layer_pattern(self) -> str:
        """One letter per layer: G global / W window attention; lower case reuses the K/V of
        the layer before it (a KV consumer)."""
        letters = ("W" if self.layer_window(i) else "G" for i in range(self.num_hidden_layers))
        return "".join(c if self.kv_producer(i) == i else c.lower() for i, c in enumerate(letters))


def default_global_layers(num_layers: int) -> list[int]:
    """First, middle and last layer (Hymba: [0, 15, 31] for 32 layers)."""
    return sorted({0, (num_layers - 1) // 2, num_layers - 1}) if num_layers > 0 else []


def default_kv_groups(num_layers: int, global_layers: list[int]) -> list[list[int]]:
    """Consecutive window layers in pairs, an odd run starting with a triple; global layers and
    single window layers keep their own K/V. For 32 layers with globals [0, 15, 31] this is the
    published ``kv_reuse_group``: [1, 2], ..., [13, 14], [16, 17, 18], [19, 20], ..., [29, 30]."""
    groups, run = [], []
    for layer in [*range(num_layers), None]:  # None flushes the last run
        if layer is not None and layer not in global_layers:
            run.append(layer)
            continue
        if len(run) >= 2:
            first = 3 if len(run) % 2 else 2
            groups.append(run[:first])
            groups += [run[i : i + 2] for i in range(first, len(run), 2)]
        run = []
    return groups


def config_problems(config: HymbaConfig) -> dict[str, str]:
    """Field -> what is wrong, for every shape the model cannot be built or run with."""
    problems = {}
    positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "v_head_dim", "mamba_num_heads", "mamba_head_dim", "n_groups",
                "ssm_state_size", "conv_kernel", "chunk_size", "sliding_window", "max_position_embeddings")
    for name in positive:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            problems[name] = f"must be a positive integer, got {value!r}"
    if not isinstance(config.num_meta_tokens, int) or config.num_meta_tokens < 0:
        problems["num_meta_tokens"] = f"must be a non-negative integer, got {config.num_meta_tokens!r}"
    if problems:
        return problems

    if config.num_attention_heads % config.num_key_value_heads:
        problems["num_attention_heads"] = (f"must be a multiple of num_key_value_heads "
                                           f"({config.num_key_value_heads}), got {config.num_attention_heads}")
    if config.head_dim % 2:
        problems["head_dim"] = f"must be even (RoPE rotates channel pairs), got {config.head_dim}"
    if config.mamba_num_heads % config.n_groups:
        problems["mamba_num_heads"] = f"must be a multiple of n_groups ({config.n_groups}), got {config.mamba_num_heads}"
    attention_width = config.num_attention_heads * config.v_head_dim
    ssm_width = config.mamba_num_heads * config.mamba_head_dim
    if attention_width != ssm_width:
        problems["v_head_dim"] = (
            f"the attention output (num_attention_heads x v_head_dim = {attention_width}) is averaged with the "
            f"SSM output (mamba_num_heads x mamba_head_dim = {ssm_width}); they must be equal"
        )
    if len(config.time_step_limit) != 2 or not 0 <= config.time_step_limit[0] < config.time_step_limit[1]:
        problems["time_step_limit"] = f"must be [low, high] with 0 <= low < high, got {config.time_step_limit!r}"

    layers = range(config.num_hidden_layers)
    bad = [i for i in config.global_attn_layers if i not in layers]
    if bad:
        problems["global_attn_layers"] = f"{bad} are not layers of a {config.num_hidden_layers}-layer model"
    seen = set()
    for group in config.kv_reuse_groups:
        if len(group) < 2 or group != list(range(group[0], group[0] + len(group))):
            problems["kv_reuse_groups"] = f"{group}: a group is two or more consecutive layers, producer first"
        elif any(i not in layers for i in group):
            problems["kv_reuse_groups"] = f"{group}: not layers of a {config.num_hidden_layers}-layer model"
        elif seen & set(group):
            problems["kv_reuse_groups"] = f"{group}: layers {sorted(seen & set(group))} are in two groups"
        elif len({config.layer_window(i) for i in group}) > 1:
            problems["kv_reuse_groups"] = (f"{group}: mixes global and window layers; a consumer must attend "
                                           "over the same positions as its producer")
        seen |= set(group)
    return problems


__all__ = ["HymbaConfig", "config_problems"]
