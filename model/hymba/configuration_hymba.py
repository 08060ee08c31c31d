"""Hymba configuration (Dong et al., "Hymba: A Hybrid-head Architecture for Small Language
Models", arXiv 2411.13676; nvidia/Hymba-1.5B-Base).

The defaults are the published 1.5B shape, with one deliberate difference: the SSM heads are
Mamba-2 (SSD) heads with ``n_groups`` B/C groups, where the release used Mamba-1. The SSM
width is the published one (d_inner 3200 = 50 heads x 64) and so is its state size (16).

``ssm_type="mamba1"`` is the release's own layout: Mamba-1 SSM channels (``x_proj`` / ``dt_proj``,
A per channel and state, RMSNorms on dt, B and C) and the release's parameter names throughout,
so a checkpoint of nvidia/Hymba-1.5B-Base loads key for key. A ``config.json`` written for the
release's code (it has ``mamba_expand``) is read as such: see ``HymbaConfig.adopt_released_fields``.

This file is copied next to the weights of every checkpoint saved by the factory (the
config's ``auto_map``), so it imports nothing but transformers.
"""

import math

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
        ssm_type (`str`, *optional*, defaults to `"mamba2"`):
            `"mamba2"`: Mamba-2 (SSD) heads in `n_groups` groups, one A, Δ and D per head, under the
            factory's names (`mixer.ssm.*`). `"mamba1"`: the release's layout, parameter for parameter:
            Mamba-1 over the d_inner channels (B and C shared by all of them, Δ from a rank
            `time_step_rank` projection, A per channel and state, D per channel) and the release's
            names everywhere (`model.memory_tokens`, `model.layers.i.mamba.*`, `pre_moe_layernorm`,
            `moe.experts.0.*`, `model.final_layernorm`).
        mamba_num_heads (`int`, *optional*, defaults to 50):
            SSM (Mamba-2) heads per layer; a multiple of `n_groups`. With `ssm_type="mamba1"` only
            `mamba_num_heads * mamba_head_dim`, the SSM width d_inner, matters (Mamba-1 has no heads).
        mamba_head_dim (`int`, *optional*, defaults to 64):
            Channels per SSM head.
        n_groups (`int`, *optional*, defaults to 5):
            Groups of SSM heads sharing B and C; heads are contiguous per group (Mamba-2 only).
        ssm_state_size (`int`, *optional*, defaults to 16):
            State size N of every SSM head (every channel, for Mamba-1).
        conv_kernel (`int`, *optional*, defaults to 4):
            Width of the causal depthwise convolution over the SSM inputs (x, B, C; x alone for Mamba-1).
        chunk_size (`int`, *optional*, defaults to 128):
            Chunk length of the chunked SSD scan (Mamba-1: of the chunked selective scan).
        use_conv_bias (`bool`, *optional*, defaults to `True`):
            Whether the SSM convolution has a bias.
        time_step_rank (`int`, *optional*):
            Mamba-1 only: rank of Δ, the width between `x_proj` and `dt_proj`. Defaults to
            `ceil(hidden_size / 16)`, the release's `"auto"` (100 at the 1.5B shape).
        ssm_inner_norms (`bool`, *optional*, defaults to `True`):
            Mamba-1 only: RMSNorms on Δ, B and C after `x_proj` (the release's `mamba_inner_layernorms`).
        ssm_norm (`str`, *optional*):
            The normalisation of the SSM output `y * silu(z)` before the branches are averaged (its weight is
            the paper's b2): `"group"`, RMS over each of the `n_groups` groups of d_inner / n_groups channels
            (Mamba-2's gated norm, so group-aware pruning keeps groups independent), or `"full"`, RMS over
            the whole d_inner width as in the release. Defaults to `"group"` for Mamba-2 and to `"full"`
            for Mamba-1 (which has no groups and requires it).
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
        rope_type (`str`, *optional*, defaults to `"default"`):
            `"default"`: RoPE with base `rope_theta`. `"ntk"`: the release's NTK-aware scaling, which
            stretches a model trained at `orig_max_position_embeddings` to `max_position_embeddings` by
            raising the base to `rope_theta * (f * max / orig - (f - 1)) ** (d / (d - 2))`, with
            f = `rope_ntk_factor` and d = `head_dim` (74,535 at the 1.5B shape: 2K -> 8K, d 64).
        rope_ntk_factor (`float`, *optional*, defaults to 2.0):
            f above; the release fixes it at 2.
        orig_max_position_embeddings (`int`, *optional*):
            The context length the model was trained at; required by `rope_type="ntk"` (2048 in the release).
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
    `global_attn_idx`, `kv_reuse_group`, `mamba_d_state`, `mamba_d_conv`, `mamba_dt_rank`,
    `mamba_conv_bias`, `mamba_inner_layernorms`; a whole released `config.json` (one with
    `mamba_expand`) is translated by `adopt_released_fields`.

    ```python
    >>> config = HymbaConfig(hidden_size=256, num_hidden_layers=7)  # global 0, 3, 6; KV pairs (1, 2), (4, 5)
    >>> # the release's layer, names and RoPE:
    >>> released = HymbaConfig(ssm_type="mamba1", rope_type="ntk", orig_max_position_embeddings=2048)
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
    ssm_type: str = "mamba2"
    mamba_num_heads: int = 50
    mamba_head_dim: int = 64
    n_groups: int = 5
    ssm_state_size: int = 16
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    time_step_rank: int | str | None = None
    ssm_inner_norms: bool = True
    ssm_norm: str | None = None
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: list[float] | None = None
    num_meta_tokens: int = 128
    sliding_window: int = 1024
    global_attn_layers: list[int] | None = None
    kv_reuse_groups: list[list[int]] | None = None
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_ntk_factor: float = 2.0
    orig_max_position_embeddings: int | None = None
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
        if "mamba_expand" in kwargs:  # a config.json written for the release's own modeling code
            self.adopt_released_fields(kwargs)
        for legacy, name in LEGACY_NAMES.items():
            if legacy in kwargs:
                setattr(self, name, kwargs.pop(legacy))
        if self.time_step_rank in (None, "auto"):
            self.time_step_rank = math.ceil(self.hidden_size / 16)
        if self.ssm_norm is None:
            self.ssm_norm = "full" if self.ssm_type == "mamba1" else "group"
        if self.time_step_limit is None:
            self.time_step_limit = [0.0, float("inf")]
        if self.global_attn_layers is None:
            self.global_attn_layers = default_global_layers(self.num_hidden_layers)
        if self.kv_reuse_groups is None:
            self.kv_reuse_groups = default_kv_groups(self.num_hidden_layers, self.global_attn_layers)
        super().__post_init__(**kwargs)

    def adopt_released_fields(self, kwargs: dict) -> None:
        """Set this config from the fields of a config.json written for the release's own code
        (nvidia/Hymba-1.5B-Base), popping from ``kwargs`` the ones it reads.

        The release derives its widths from ``hidden_size``: q is hidden_size wide (head_dim =
        hidden / heads), d_inner = ``mamba_expand`` x hidden, and it overwrites ``v_head_dim`` with
        d_inner / heads so that the attention output is d_inner wide. Here the SSM width is
        ``mamba_num_heads x mamba_head_dim``, so it becomes heads x v_head_dim. Its window mask is
        ``q - k <= sliding_window`` (flex and flash attention alike), W + 1 positions with the
        query's own; the factory counts the query in its window, so ``sliding_window`` becomes W + 1.
        Options of the release's code that the factory does not implement raise a ValueError.
        """
        unsupported = {}
        for name, supported in RELEASED_FIXED_FIELDS.items():
            if name in kwargs and kwargs[name] not in supported:
                unsupported[name] = kwargs[name]
            kwargs.pop(name, None)
        head_dim, rest = divmod(self.hidden_size, self.num_attention_heads)
        d_inner = int(kwargs.pop("mamba_expand") * self.hidden_size)
        for name in ("attn_hidden_size", "kq_head_dim"):  # -1: "derive it", the only value the release runs
            value = kwargs.pop(name, -1)
            if value > 0 and value != (self.hidden_size if name == "attn_hidden_size" else head_dim):
                unsupported[name] = value
        if rest or d_inner % self.num_attention_heads:
            unsupported["num_attention_heads"] = (f"{self.num_attention_heads} must divide hidden_size "
                                                  f"({self.hidden_size}) and d_inner ({d_inner})")
        if unsupported:
            raise ValueError(f"this released Hymba config uses options the factory does not implement: "
                             f"{unsupported}")
        for name in RELEASED_RUNTIME_FIELDS:
            kwargs.pop(name, None)

        self.ssm_type, self.ssm_norm, self.n_groups = "mamba1", "full", 1
        self.head_dim = head_dim
        self.v_head_dim = self.mamba_head_dim = d_inner // self.num_attention_heads
        self.mamba_num_heads = self.num_attention_heads
        if self.rope_type is None:
            self.rope_type = "default"  # the release's None: plain RoPE
        if "kv_reuse_group" in kwargs and kwargs["kv_reuse_group"] is None:
            kwargs["kv_reuse_group"] = []  # the release's None shares nothing; ours means the default groups
        if self.sliding_window is None:  # the release without windows: every layer global
            kwargs["global_attn_idx"] = list(range(self.num_hidden_layers))
            self.sliding_window = self.max_position_embeddings
        else:
            self.sliding_window += 1

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


# The names of the published config.json (nvidia/Hymba-1.5B-Base) -> ours, in one place.
LEGACY_NAMES = {"num_memory_tokens": "num_meta_tokens", "global_attn_idx": "global_attn_layers",
                "kv_reuse_group": "kv_reuse_groups", "mamba_d_state": "ssm_state_size",
                "mamba_d_conv": "conv_kernel", "mamba_dt_rank": "time_step_rank",
                "mamba_conv_bias": "use_conv_bias", "mamba_inner_layernorms": "ssm_inner_norms"}

# Options of the release's code the factory implements in one setting only: name -> the values that are it.
RELEASED_FIXED_FIELDS = {
    "rope": (True,),  # RoPE on q and k
    "kq_norm": ("none", None),  # no q/k norms
    "num_experts": (1,),  # one FFN expert: no router
    "num_mamba": (1,),  # one SSM per layer
    "mamba_proj_bias": (False,),  # in_proj / out_proj without bias
    "hidden_act": ("silu",),  # the SSM conv activation
    "mlp_hidden_act": ("silu",),  # SwiGLU
    "memory_tokens_interspersed_every": (0,),  # meta tokens once, in front
    "kv_reuse_every_i_layer": (-1, 0),  # KV sharing by kv_reuse_group only
    "kv_weight_reuse": (False,),
}
# Fields of the release's config.json that steer its code at run time and mean nothing here.
RELEASED_RUNTIME_FIELDS = ("attn_implementation", "attn_implementation_new", "layer_type", "conv_dim",
                           "calc_logits_for_entire_prompt", "num_experts_per_tok", "router_aux_loss_coef",
                           "output_router_logits")


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
                "ssm_state_size", "conv_kernel", "chunk_size", "time_step_rank", "sliding_window",
                "max_position_embeddings")
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
    if config.ssm_type not in ("mamba1", "mamba2"):
        problems["ssm_type"] = f"must be 'mamba1' or 'mamba2', got {config.ssm_type!r}"
    if config.ssm_norm not in ("group", "full"):
        problems["ssm_norm"] = f"must be 'group' or 'full', got {config.ssm_norm!r}"
    elif config.ssm_type == "mamba1" and config.ssm_norm != "full":
        problems["ssm_norm"] = "must be 'full' with ssm_type 'mamba1': Mamba-1 has no B/C groups to norm over"
    if config.ssm_type == "mamba2" and config.mamba_num_heads % config.n_groups:
        problems["mamba_num_heads"] = f"must be a multiple of n_groups ({config.n_groups}), got {config.mamba_num_heads}"
    if config.rope_type not in ("default", "ntk"):
        problems["rope_type"] = f"must be 'default' or 'ntk', got {config.rope_type!r}"
    elif config.rope_type == "ntk":
        orig = config.orig_max_position_embeddings
        longest = config.max_position_embeddings
        if not isinstance(orig, int) or isinstance(orig, bool) or not 0 < orig <= longest:
            problems["orig_max_position_embeddings"] = (
                f"rope_type 'ntk' needs the trained context length, a positive integer up to "
                f"max_position_embeddings ({longest}), got {orig!r}")
        if not config.rope_ntk_factor >= 1:
            problems["rope_ntk_factor"] = f"must be at least 1, got {config.rope_ntk_factor!r}"
        if config.head_dim <= 2:
            problems["head_dim"] = (f"rope_type 'ntk' raises the base to the power d / (d - 2): needs "
                                    f"head_dim > 2, got {config.head_dim}")
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
