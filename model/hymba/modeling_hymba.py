"""Hymba as a transformers model: hybrid-head layers with attention and SSM heads in parallel,
meta tokens, cross-layer KV sharing and partial sliding-window attention.

Paper: Dong et al., "Hymba: A Hybrid-head Architecture for Small Language Models"
(arXiv 2411.13676); release: nvidia/Hymba-1.5B-Base. One layer is

    x = x + HybridMixer(RMSNorm(x))
    x = x + SwiGLU(RMSNorm(x))

    HybridMixer(u): q | k | v | z | xBC | dt = in_proj(u)           one projection feeds both
                    a = RMSNorm_b1(Attention(q, k, v))               GQA + RoPE, global or window
                    s = GatedRMSNorm_b2(SSD(xBC, dt), z)             Mamba-2 heads in n_groups groups
                    out_proj((a + s) / 2)

b1 and b2 are the learnable per-channel scales of the paper (the weights of the two norms).
``ssm_type`` picks the SSM heads:

- ``"mamba2"`` (the default; ``HymbaHybridMixer``): Mamba-2 (SSD) heads with grouped B/C and
  Mamba-2's gated group RMSNorm (``ssm_norm="group"``), so the SSM branch is exactly a Mamba-2
  mixer up to its out_proj and prunes the same way. Parameters under the factory's names.
- ``"mamba1"`` (``HymbaMamba1Mixer``): the release's layer, parameter for parameter and under its
  names, so its checkpoints load key for key:

    HymbaBlock(u): q | k | v | x | z = in_proj(u)
                   a = Attention(q, k, v)
                   x = silu(conv1d(x));  Δ, B, C = RMSNorms(x_proj(x));  Δ = softplus(dt_proj(Δ))
                   y = SelectiveScan(x, Δ, A, B, C) + D x                 A (d_inner, N), per channel
                   out_proj((pre_avg_layernorm1(a) + pre_avg_layernorm2(y * silu(z))) / 2)

What differs from the release, on purpose:

- Every device has a PyTorch path (chunked SSD or a chunked selective scan for sequences, the
  recurrence for decoding); the fused ``mamba_ssm`` / ``causal_conv1d`` kernels run only on CUDA
  when they import, and only for Mamba-2 (the release needs them for everything).
- One sliding-window convention, for prefill and decoding alike: a token sees ``sliding_window``
  positions, its own included. The release prefills with ``q - k <= W`` (W + 1 positions) and
  decodes with W; a released config.json is read with ``sliding_window`` W + 1 (its training mask).
- RoPE is plain unless ``rope_type="ntk"`` (the release's NTK scaling, 2K-trained to 8K).

Meta tokens are prepended to the first forward of a sequence (no cache, or an empty one);
their K/V and SSM state stay in the cache and their hidden states are dropped before the LM
head. Positions count them: text token t sits at position num_meta_tokens + t. Batches must
not be padded (as in the release): pass equal-length sequences.

This file is copied next to the weights of every checkpoint saved by the factory, so a
checkpoint loads with ``trust_remote_code=True`` from its folder alone: it imports only
torch and transformers (and, lazily on CUDA, the optional kernels).
"""

import importlib.util
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .configuration_hymba import HymbaConfig, config_problems

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------
# Optional fused kernels (CUDA only; imported on first use, never on CPU)
# --------------------------------------------------------------------------------------

_KERNELS: dict | None = None


def fused_kernels() -> dict:
    """The mamba_ssm / causal_conv1d kernels by name, or {} when they are not installed."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = {}
        if importlib.util.find_spec("mamba_ssm") and importlib.util.find_spec("causal_conv1d"):
            try:
                from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
                from mamba_ssm.ops.triton.selective_state_update import selective_state_update
                from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

                _KERNELS = dict(causal_conv1d_fn=causal_conv1d_fn, causal_conv1d_update=causal_conv1d_update,
                                selective_state_update=selective_state_update,
                                mamba_chunk_scan_combined=mamba_chunk_scan_combined)
            except Exception as e:  # a build that does not match this torch / CUDA
                logger.warning_once(f"mamba_ssm / causal_conv1d are installed but failed to import ({e}); "
                                    "Hymba falls back to its PyTorch SSM path.")
        if not _KERNELS:
            logger.warning_once("Hymba on CUDA without the fused kernels: falling back to the PyTorch SSM path. "
                                "Install them with `pip install mamba-ssm causal-conv1d` "
                                "(https://github.com/state-spaces/mamba).")
    return _KERNELS


# --------------------------------------------------------------------------------------
# Mamba-2 SSD: the chunked scan and the recurrence (docs/architectures.md, section 3)
# --------------------------------------------------------------------------------------


def segsum(x: torch.Tensor) -> torch.Tensor:
    """Stable segment sum (ssd_minimal.py): out[..., i, j] = x[..., j+1] + ... + x[..., i] for
    j <= i, -inf above the diagonal. Masks before the cumsum, so no large values cancel.
    x (..., T) -> (..., T, T)."""
    length = x.size(-1)
    x = x[..., None].expand(*x.shape, length)  # (..., T, T): x[..., i, j] = x_i
    strictly_lower = torch.tril(torch.ones(length, length, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~strictly_lower, 0)
    sums = torch.cumsum(x, dim=-2)
    lower = torch.tril(torch.ones(length, length, dtype=torch.bool, device=x.device), diagonal=0)
    return sums.masked_fill(~lower, -torch.inf)


def ssd_chunked(X: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int,
                initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan in chunks (Listing 1 of the Mamba-2 paper, as mamba_ssm's ssd_minimal.py).

    Inputs are discretised: X = x * Δ (b, T, h, p), A = A * Δ (b, T, h); B, C (b, T, h, n)
    already expanded from groups to heads; initial_state (b, h, p, n) or None for zeros.
    T need not divide by chunk_size: the tail is padded with A = 0, X = 0, which leaves the
    state unchanged. Returns y (b, T, h, p) without the D skip, and the final state (b, h, p, n).
    """
    batch, length, heads, head_dim = X.shape
    pad = (-length) % chunk_size
    X, A, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (X, A, B, C))
    chunks = (length + pad) // chunk_size
    X, B, C = (t.reshape(batch, chunks, chunk_size, *t.shape[2:]) for t in (X, B, C))  # (b, c, l, h, .)
    A = A.reshape(batch, chunks, chunk_size, heads).permute(0, 3, 1, 2)  # (b, h, c, l)
    A_cumsum = torch.cumsum(A, dim=-1)

    # 1. Within each chunk (the diagonal blocks): y_l = sum_{s<=l} C_l . B_s exp(A_s+1..A_l) X_s
    L = torch.exp(segsum(A))  # (b, h, c, l, s)
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L, X)

    # 2. The state each chunk builds from its own inputs, decayed to the chunk's end
    decay_states = torch.exp(A_cumsum[..., -1:] - A_cumsum)  # (b, h, c, l)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)  # (b, c, h, p, n)

    # 3. Carry states across chunk boundaries: the state entering each chunk, and the last one
    if initial_state is None:
        initial_state = torch.zeros_like(states[:, 0])
    states = torch.cat([initial_state[:, None], states], dim=1)  # (b, c+1, h, p, n)
    decay_chunk = torch.exp(segsum(F.pad(A_cumsum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]

    # 4. What the entering state contributes to every position of its chunk
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(A_cumsum))
    Y = (Y_diag + Y_off).reshape(batch, chunks * chunk_size, heads, head_dim)
    return Y[:, :length], final_state


def ssd_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence: S = exp(Δ A) S + Δ x B^T, y = S C (section 3.1).

    state (b, h, p, n); x (b, h, p); dt = Δ after softplus (b, h); A (h,); B, C (b, h, n).
    Returns y (b, h, p) without the D skip, and the new state."""
    decay = torch.exp(dt * A)  # (b, h)
    state = state * decay[:, :, None, None] + (dt[:, :, None] * x)[..., None] * B[:, :, None, :]
    return torch.einsum("bhpn,bhn->bhp", state, C), state


# --------------------------------------------------------------------------------------
# Mamba-1 selective scan (ssm_type mamba1): the recurrence one position at a time (the
# reference) and the same recurrence as chunked parallel prefix scans (the path the model runs)
# --------------------------------------------------------------------------------------


def selective_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the Mamba-1 recurrence, per channel d: h = exp(Δ A) h + Δ x B, y = h C.

    state (b, d, n); x (b, d); dt = Δ after softplus (b, d); A (d, n); B, C (b, n), shared by
    every channel. Returns y (b, d) without the D skip, and the new state."""
    decay = torch.exp(dt[..., None] * A)  # (b, d, n)
    state = state * decay + (dt * x)[..., None] * B[:, None, :]
    return torch.einsum("bdn,bn->bd", state, C), state


def selective_scan_ref(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference scan: ``selective_step`` at every position in turn (what mamba_ssm's
    ``selective_scan_ref`` computes, without D and z).

    x, dt (b, T, d); A (d, n); B, C (b, T, n); initial_state (b, d, n) or None for zeros.
    Returns y (b, T, d) without the D skip, and the final state (b, d, n)."""
    batch, length, channels = x.shape
    state = x.new_zeros(batch, channels, A.shape[-1]) if initial_state is None else initial_state
    ys = []
    for t in range(length):
        y, state = selective_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), state


def selective_scan_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                           C: torch.Tensor, chunk_size: int, initial_state: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same recurrence a chunk of positions at a time. Within a chunk, h_t = a_t h_{t-1} + b_t
    (a_t = exp(Δ_t A), b_t = Δ_t x_t B_t) is an inclusive scan of the affine maps (a_t, b_t), done by
    doubling: after the step of span s every position holds the composition of the 2s maps ending at
    it, (a_t a_{t-s}, a_t b_{t-s} + b_t). The chunk's last state enters the next one.

    Decays (<= 1) are only multiplied, never divided, so long spans cannot overflow; memory is
    (b, chunk, d, n). Same arguments and results as ``selective_scan_ref``, plus ``chunk_size``."""
    batch, length, channels = x.shape
    state = x.new_zeros(batch, channels, A.shape[-1]) if initial_state is None else initial_state
    ys = []
    for start in range(0, length, chunk_size):
        span = slice(start, start + chunk_size)
        a = torch.exp(dt[:, span, :, None] * A)  # (b, l, d, n)
        h = (dt[:, span] * x[:, span])[..., None] * B[:, span, None, :]  # (b, l, d, n): b_t
        h = torch.cat([h[:, :1] + a[:, :1] * state[:, None], h[:, 1:]], dim=1)  # the entering state
        step = 1
        while step < h.shape[1]:
            h = torch.cat([h[:, :step], h[:, step:] + a[:, step:] * h[:, :-step]], dim=1)
            a = torch.cat([a[:, :step], a[:, step:] * a[:, :-step]], dim=1)
            step *= 2
        ys.append(torch.einsum("bldn,bln->bld", h, C[:, span]))  # (b, l, d)
        state = h[:, -1]
    return torch.cat(ys, dim=1), state


# --------------------------------------------------------------------------------------
# Attention helpers
# --------------------------------------------------------------------------------------


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE cos and sin at absolute ``positions`` (L,): two (L, head_dim/2) float32 tables."""
    half = head_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (L, d/2)
    return angles.cos(), angles.sin()


def rope_base(config: HymbaConfig) -> float:
    """The RoPE base: ``rope_theta``, or with ``rope_type="ntk"`` the release's NTK-aware base
    theta * (f * max_len / orig_len - (f - 1)) ** (d / (d - 2)) (f = ``rope_ntk_factor``, d = head_dim),
    which keeps the lowest frequency's wavelength in proportion to the longer context."""
    if config.rope_type != "ntk":
        return config.rope_theta
    factor, d = config.rope_ntk_factor, config.head_dim
    stretch = factor * config.max_position_embeddings / config.orig_max_position_embeddings - (factor - 1)
    return config.rope_theta * stretch ** (d / (d - 2))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + d/2) of x (b, heads, L, d) (the rotate-half convention)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def attention_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, num_meta: int,
                   window: int | None) -> torch.Tensor:
    """(Lq, Lk) bool, True where a query may attend: causal, and on window layers only to the
    last ``window`` positions (its own included) or to a meta token (position < num_meta)."""
    offset = query_positions[:, None] - key_positions[None, :]  # (Lq, Lk)
    allowed = offset >= 0
    if window is not None:
        allowed &= (offset < window) | (key_positions[None, :] < num_meta)
    return allowed


@dataclass
class ForwardContext:
    """What one forward pass computes once and every layer reads."""

    positions: torch.Tensor  # (L,) absolute positions of this forward's rows, meta tokens counted
    cos: torch.Tensor  # (L, head_dim/2) RoPE tables at those positions
    sin: torch.Tensor
    num_meta: int
    shared_kv: dict = field(default_factory=dict)  # producer layer -> (keys, values, key positions)
    masks: dict = field(default_factory=dict)

    def mask(self, key_positions: torch.Tensor, window: int | None, repeats: int) -> torch.Tensor:
        """attention_mask with its rows repeated ``repeats`` times, (repeats*L, S). Within one
        forward every layer of one kind (global or window) holds the same key positions, so
        (window, S) names the mask."""
        key = (window, key_positions.shape[0], repeats)
        if key not in self.masks:
            mask = attention_mask(self.positions, key_positions, self.num_meta, window)
            self.masks[key] = mask.repeat(repeats, 1)
        return self.masks[key]


# --------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------


class HymbaLayerCache:
    """The decoding state of one layer.

    keys (b, kv_heads, S, head_dim) post-RoPE, values (b, kv_heads, S, v_head_dim) and
    key_positions (S,): the meta tokens first, then text. A window layer keeps the meta tokens
    and the last ``window - 1`` positions (with the next token that makes its window of W); a
    KV consumer keeps none and reads its producer's. conv_state (b, conv_dim, K-1) holds the last
    pre-activation conv inputs (Mamba-1: conv_dim = d_inner, x alone); ssm_state the SSM state in
    float32, (b, heads, head_dim, N) for Mamba-2 and (b, d_inner, N) for Mamba-1.
    """

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, owns_kv: bool, window: int | None, num_meta: int):
        self.owns_kv, self.window, self.num_meta = owns_kv, window, num_meta
        self.keys = self.values = self.key_positions = None
        self.conv_state = self.ssm_state = None

    def update_kv(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
        """Append this forward's K/V; returns everything the new queries attend over, and keeps
        only what later queries can still see."""
        if not self.owns_kv:
            raise RuntimeError("a KV-consumer layer has no K/V cache of its own")
        if self.keys is not None:
            keys = torch.cat([self.keys, keys], dim=2)
            values = torch.cat([self.values, values], dim=2)
            positions = torch.cat([self.key_positions, positions])
        self.keys, self.values, self.key_positions = keys, values, positions
        if self.window is not None:
            meta = int((positions < self.num_meta).sum())  # the meta tokens lead the cache
            text = positions.shape[0] - meta
            drop = max(0, text - (self.window - 1))
            if drop:
                keep = torch.cat([torch.arange(meta), torch.arange(meta + drop, positions.shape[0])]).to(keys.device)
                self.keys, self.values = keys.index_select(2, keep), values.index_select(2, keep)
                self.key_positions = positions.index_select(0, keep)
        return keys, values, positions

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.values, self.conv_state, self.ssm_state) if t is not None]

    def _map_batch(self, fn) -> None:
        for name in ("keys", "values", "conv_state", "ssm_state"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        self.keys = self.values = self.key_positions = None
        self.conv_state = self.ssm_state = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("a Hymba cache cannot be rolled back: the SSM state has no history")

    def get_max_length(self) -> int:
        return -1


class HymbaCache(Cache):
    """What ``generate`` carries between steps: one ``HymbaLayerCache`` per layer, and the
    number of text tokens seen (meta tokens not counted, so it matches the input ids)."""

    def __init__(self, config: HymbaConfig):
        layers = [HymbaLayerCache(owns_kv=config.kv_producer(i) == i, window=config.layer_window(i),
                                  num_meta=config.num_meta_tokens) for i in range(config.num_hidden_layers)]
        super().__init__(layers=layers)
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    def cache_bytes(self) -> int:
        """Bytes of every tensor the cache holds (K/V, conv and SSM states)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())


# --------------------------------------------------------------------------------------
# Modules, one per block type
# --------------------------------------------------------------------------------------


class HymbaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class HymbaRMSNormGated(nn.Module):
    """Mamba-2's output norm: y * silu(z) first (norm_before_gate=False), then RMS over groups
    of size d_inner / n_groups, which line up with the B/C groups."""

    def __init__(self, hidden_size: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size, self.eps = group_size, eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float() * F.silu(gate.float())
        *prefix, width = x.shape
        x = x.view(*prefix, width // self.group_size, self.group_size)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.view(*prefix, width).to(dtype)


class HymbaAttention(nn.Module):
    """The attention heads of a hybrid layer: takes q, k, v from the shared projection (no
    projections of its own), applies RoPE and GQA, and normalises its output (weight = b1).
    A KV consumer gets its producer's post-RoPE K/V from the forward context and computes none.
    With ``norm=False`` it has no parameters and returns the output unnormalised (the Mamba-1
    mixer holds b1 as the release names it, ``pre_avg_layernorm1``)."""

    def __init__(self, config: HymbaConfig, layer_idx: int, norm: bool = True):
        super().__init__()
        self.layer_idx = layer_idx
        self.kv_producer = config.kv_producer(layer_idx)
        self.owns_kv = self.kv_producer == layer_idx
        self.window = config.layer_window(layer_idx)
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.v_head_dim = config.head_dim, config.v_head_dim
        width = config.num_attention_heads * config.v_head_dim
        self.norm = HymbaRMSNorm(width, config.rms_norm_eps) if norm else None

    def forward(self, q, k, v, context: ForwardContext, layer_cache: HymbaLayerCache | None) -> torch.Tensor:
        # q (b, L, heads*head_dim); k (b, L, kv_heads*head_dim), v (b, L, kv_heads*v_head_dim), empty on consumers
        batch, length = q.shape[:2]
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (b, heads, L, head_dim)
        q = apply_rotary(q, context.cos, context.sin)
        if self.owns_kv:
            k = k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (b, kv_heads, L, head_dim)
            k = apply_rotary(k, context.cos, context.sin)
            v = v.view(batch, length, self.num_kv_heads, self.v_head_dim).transpose(1, 2)  # (b, kv_heads, L, v_head_dim)
            key_positions = context.positions
            if layer_cache is not None:
                k, v, key_positions = layer_cache.update_kv(k, v, key_positions)
            context.shared_kv[self.layer_idx] = (k, v, key_positions)
        else:
            k, v, key_positions = context.shared_kv[self.kv_producer]

        # GQA without copying K/V: the `groups` query heads of one KV head become groups x L query
        # rows against that head (heads are KV-major: head h reads KV head h // groups).
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(batch, self.num_kv_heads, groups * length, self.head_dim)
        mask = context.mask(key_positions, self.window, repeats=groups)  # (groups*L, S)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (b, kv_heads, groups*L, v_head_dim)
        out = out.view(batch, self.num_heads, length, self.v_head_dim).transpose(1, 2)  # (b, L, heads, v_head_dim)
        out = out.reshape(batch, length, self.num_heads * self.v_head_dim)
        return out if self.norm is None else self.norm(out)


class HymbaSSM(nn.Module):
    """The SSM heads of a hybrid layer: Mamba-2 (SSD) heads without their in/out projections
    (the layer's shared in_proj and out_proj play those roles).

    Tensors as in Mamba-2: conv1d over x | B | C (depthwise, causal, then SiLU); dt_bias,
    A_log, D per head; norm = gated group RMSNorm (weight = b2), over the groups or, with
    ``ssm_norm="full"``, over the whole width as the release does. Head h owns channels
    [h*P, (h+1)*P) and reads B, C of group h // (heads / n_groups).
    """

    def __init__(self, config: HymbaConfig, layer_idx: int):
        super().__init__()
        self.num_heads, self.head_dim = config.mamba_num_heads, config.mamba_head_dim
        self.n_groups, self.state_size = config.n_groups, config.ssm_state_size
        self.d_inner = self.num_heads * self.head_dim
        self.conv_dim = self.d_inner + 2 * self.n_groups * self.state_size
        self.conv_kernel, self.chunk_size = config.conv_kernel, config.chunk_size
        self.time_step_limit = tuple(config.time_step_limit)
        self.use_kernels = config.use_mamba_kernels
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.conv_kernel, groups=self.conv_dim,
                                bias=config.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        norm_width = self.d_inner if config.ssm_norm == "full" else self.d_inner // self.n_groups
        self.norm = HymbaRMSNormGated(self.d_inner, norm_width, config.rms_norm_eps)

    def forward(self, z, xBC, dt, layer_cache: HymbaLayerCache | None) -> torch.Tensor:
        # z (b, L, d_inner), xBC (b, L, conv_dim), dt (b, L, heads) -> (b, L, d_inner)
        if self.use_kernels and xBC.is_cuda and not torch.compiler.is_compiling():
            kernels = fused_kernels()
            if kernels:
                return self.cuda_kernels_forward(z, xBC, dt, layer_cache, kernels)
        return self.torch_forward(z, xBC, dt, layer_cache)

    def _split_heads(self, xBC: torch.Tensor):
        """x (b, L, h, p); B, C (b, L, h, n) repeated from groups to heads (contiguous per group)."""
        batch, length = xBC.shape[:2]
        gn = self.n_groups * self.state_size
        x, B, C = xBC.split([self.d_inner, gn, gn], dim=-1)
        per_group = self.num_heads // self.n_groups
        B = B.reshape(batch, length, self.n_groups, self.state_size).repeat_interleave(per_group, dim=2)
        C = C.reshape(batch, length, self.n_groups, self.state_size).repeat_interleave(per_group, dim=2)
        return x.reshape(batch, length, self.num_heads, self.head_dim), B, C

    def torch_forward(self, z, xBC, dt, layer_cache: HymbaLayerCache | None) -> torch.Tensor:
        batch, length, _ = xBC.shape
        # Causal depthwise conv over [previous K-1 inputs | this forward's inputs]; zeros at the start.
        if layer_cache is not None and layer_cache.conv_state is not None:
            past = layer_cache.conv_state
        else:
            past = xBC.new_zeros(batch, self.conv_dim, self.conv_kernel - 1)
        conv_in = torch.cat([past, xBC.transpose(1, 2)], dim=-1)  # (b, conv_dim, K-1+L)
        if length == 1:  # one position: the conv is a dot product with the window (as Mamba2.step)
            xBC = (conv_in * self.conv1d.weight[:, 0]).sum(-1, keepdim=True)  # (b, conv_dim, 1)
            xBC = xBC + self.conv1d.bias[:, None] if self.conv1d.bias is not None else xBC
        else:
            xBC = F.conv1d(conv_in, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)  # (b, conv_dim, L)
        x, B, C = self._split_heads(F.silu(xBC).transpose(1, 2))  # (b, L, h, p), (b, L, h, n), (b, L, h, n)

        # The scan runs in float32 whatever the autocast: exp(A*dt) over long spans needs it.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32, B, C = x.float(), B.float(), C.float()
            dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.time_step_limit)  # (b, L, h)
            A = -torch.exp(self.A_log.float())  # (h,)
            state = layer_cache.ssm_state if layer_cache is not None else None
            if layer_cache is not None and length == 1:  # decoding: one step of the recurrence
                if state is None:
                    state = x32.new_zeros(batch, self.num_heads, self.head_dim, self.state_size)
                y, state = ssd_step(state, x32[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
                y = y[:, None]  # (b, 1, h, p)
            else:
                y, state = ssd_chunked(x32 * dt[..., None], A * dt, B, C, self.chunk_size, initial_state=state)
            y = y + x32 * self.D.float()[:, None]  # (b, L, h, p)

        if layer_cache is not None:
            layer_cache.conv_state = conv_in[..., conv_in.shape[-1] - (self.conv_kernel - 1):].contiguous()
            layer_cache.ssm_state = state
        return self.norm(y.reshape(batch, length, self.d_inner).to(z.dtype), gate=z)

    def cuda_kernels_forward(self, z, xBC, dt, layer_cache: HymbaLayerCache | None, kernels: dict) -> torch.Tensor:
        """The same computation through mamba_ssm's Triton SSD kernels and causal_conv1d."""
        batch, length, _ = xBC.shape
        weight = self.conv1d.weight.squeeze(1)  # (conv_dim, K)
        A = -torch.exp(self.A_log.float())  # (h,)
        has_past = layer_cache is not None and layer_cache.conv_state is not None
        if has_past and length == 1:  # decoding: conv_state and ssm_state are updated in place
            xBC = kernels["causal_conv1d_update"](xBC[:, 0], layer_cache.conv_state, weight, self.conv1d.bias, "silu")
            gn = self.n_groups * self.state_size
            x, B, C = xBC.split([self.d_inner, gn, gn], dim=-1)  # (b, d_inner), (b, G*N), (b, G*N)
            x = x.reshape(batch, self.num_heads, self.head_dim)
            B = B.reshape(batch, self.n_groups, self.state_size)
            C = C.reshape(batch, self.n_groups, self.state_size)
            # The kernel takes per-channel dt, A, D: broadcast the per-head values over P (stride 0).
            shape = (self.num_heads, self.head_dim)
            y = kernels["selective_state_update"](
                layer_cache.ssm_state, x, dt[:, 0, :, None].expand(batch, *shape),
                A[:, None, None].expand(*shape, self.state_size), B, C, self.D[:, None].expand(shape),
                z=None, dt_bias=self.dt_bias[:, None].expand(shape), dt_softplus=True,
            )  # (b, h, p)
            return self.norm(y.reshape(batch, 1, self.d_inner).to(z.dtype), gate=z)

        if has_past:  # a continuation chunk: prepend the cached inputs (the conv is cheap in torch)
            conv_in = torch.cat([layer_cache.conv_state, xBC.transpose(1, 2)], dim=-1)
            xBC_act = F.silu(F.conv1d(conv_in, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim))
        else:
            conv_in = F.pad(xBC.transpose(1, 2), (self.conv_kernel - 1, 0))
            xBC_act = kernels["causal_conv1d_fn"](xBC.transpose(1, 2).contiguous(), weight, self.conv1d.bias,
                                                  activation="silu")
        xBC_act = xBC_act.transpose(1, 2)  # (b, L, conv_dim)
        gn = self.n_groups * self.state_size
        x, B, C = xBC_act.split([self.d_inner, gn, gn], dim=-1)
        state = layer_cache.ssm_state if layer_cache is not None else None
        y, final_state = kernels["mamba_chunk_scan_combined"](
            x.reshape(batch, length, self.num_heads, self.head_dim), dt, A,
            B.reshape(batch, length, self.n_groups, self.state_size),
            C.reshape(batch, length, self.n_groups, self.state_size),
            chunk_size=self.chunk_size, D=self.D, z=None, dt_bias=self.dt_bias, initial_states=state,
            dt_softplus=True, dt_limit=self.time_step_limit, return_final_states=True,
        )  # (b, L, h, p), (b, h, p, n)
        if layer_cache is not None:
            layer_cache.conv_state = conv_in[..., conv_in.shape[-1] - (self.conv_kernel - 1):].contiguous()
            layer_cache.ssm_state = final_state.float()
        return self.norm(y.reshape(batch, length, self.d_inner).to(z.dtype), gate=z)


class HymbaHybridMixer(nn.Module):
    """One input projection feeding attention and SSM heads in parallel; each branch's output
    is normalised and scaled per channel (b1, b2), the two are averaged and projected out.

    in_proj output rows, in order: q | k | v | z | x | B | C | dt
      q  heads * head_dim            k  kv_heads * head_dim       v  kv_heads * v_head_dim
      z  d_inner (the SSM gate)       x  d_inner  B, C  n_groups * N each   dt  mamba heads
    A KV consumer's in_proj has no k and v rows.
    """

    def __init__(self, config: HymbaConfig, layer_idx: int):
        super().__init__()
        self.attention = HymbaAttention(config, layer_idx)
        self.ssm = HymbaSSM(config, layer_idx)
        kv_rows = config.num_key_value_heads * (config.head_dim + config.v_head_dim) if self.attention.owns_kv else 0
        self.split_sizes = [
            config.num_attention_heads * config.head_dim,
            config.num_key_value_heads * config.head_dim if kv_rows else 0,
            config.num_key_value_heads * config.v_head_dim if kv_rows else 0,
            self.ssm.d_inner,
            self.ssm.conv_dim,
            self.ssm.num_heads,
        ]
        self.in_proj = nn.Linear(config.hidden_size, sum(self.split_sizes), bias=False)
        self.out_proj = nn.Linear(self.ssm.d_inner, config.hidden_size, bias=False)

    def forward(self, hidden_states, context: ForwardContext, layer_cache: HymbaLayerCache | None) -> torch.Tensor:
        q, k, v, z, xBC, dt = self.in_proj(hidden_states).split(self.split_sizes, dim=-1)  # (b, L, .)
        attention_out = self.attention(q, k, v, context, layer_cache)  # (b, L, d_inner)
        ssm_out = self.ssm(z, xBC, dt, layer_cache)  # (b, L, d_inner)
        return self.out_proj((attention_out + ssm_out) / 2)


class HymbaMamba1Mixer(nn.Module):
    """The hybrid-head mixer of ``ssm_type="mamba1"``: the release's ``HymbaBlock``, parameter for
    parameter, under its names (the state-dict keys ``model.layers.i.mamba.*``).

    in_proj output rows, in order: q | k | v | x | z
      q  heads * head_dim      k  kv_heads * head_dim      v  kv_heads * v_head_dim      x, z  d_inner
    A KV consumer's in_proj has no k and v rows.

    The SSM is Mamba-1 over the d_inner channels: conv1d (depthwise, causal, SiLU) on x; x_proj
    gives Δ (rank R), B and C (N each, shared by every channel), each through its RMSNorm
    (dt_layernorm, B_layernorm, C_layernorm); dt_proj lifts Δ to d_inner (its bias is Δ's bias,
    added in float32 before the softplus); A_log (d_inner, N) and D (d_inner) per channel. x_proj,
    dt_proj, A_log and D are one-element lists, as in the release (one SSM per layer: x_proj.0.weight).
    The attention output is normalised by pre_avg_layernorm1 (b1), the gated SSM output y * silu(z)
    by pre_avg_layernorm2 (b2), both over the full d_inner width.
    """

    def __init__(self, config: HymbaConfig, layer_idx: int):
        super().__init__()
        self.attention = HymbaAttention(config, layer_idx, norm=False)
        self.d_inner = config.mamba_num_heads * config.mamba_head_dim
        self.state_size, self.time_step_rank = config.ssm_state_size, config.time_step_rank
        self.conv_kernel, self.chunk_size = config.conv_kernel, config.chunk_size
        self.time_step_limit = tuple(config.time_step_limit)
        owns_kv = self.attention.owns_kv
        self.split_sizes = [
            config.num_attention_heads * config.head_dim,
            config.num_key_value_heads * config.head_dim if owns_kv else 0,
            config.num_key_value_heads * config.v_head_dim if owns_kv else 0,
            self.d_inner,
            self.d_inner,
        ]
        self.pre_avg_layernorm1 = HymbaRMSNorm(self.d_inner, config.rms_norm_eps)
        self.pre_avg_layernorm2 = HymbaRMSNormGated(self.d_inner, self.d_inner, config.rms_norm_eps)
        self.in_proj = nn.Linear(config.hidden_size, sum(self.split_sizes), bias=False)
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, config.conv_kernel, groups=self.d_inner,
                                bias=config.use_conv_bias)
        x_proj_rows = self.time_step_rank + 2 * self.state_size  # Δ | B | C
        self.x_proj = nn.ModuleList([nn.Linear(self.d_inner, x_proj_rows, bias=False)])
        self.dt_proj = nn.ModuleList([nn.Linear(self.time_step_rank, self.d_inner, bias=True)])
        self.A_log = nn.ParameterList([nn.Parameter(torch.zeros(self.d_inner, self.state_size))])
        self.D = nn.ParameterList([nn.Parameter(torch.ones(self.d_inner))])
        if config.ssm_inner_norms:
            self.dt_layernorm = HymbaRMSNorm(self.time_step_rank, config.rms_norm_eps)
            self.B_layernorm = HymbaRMSNorm(self.state_size, config.rms_norm_eps)
            self.C_layernorm = HymbaRMSNorm(self.state_size, config.rms_norm_eps)
        else:
            self.dt_layernorm = self.B_layernorm = self.C_layernorm = None

    def forward(self, hidden_states, context: ForwardContext, layer_cache: HymbaLayerCache | None) -> torch.Tensor:
        q, k, v, x, z = self.in_proj(hidden_states).split(self.split_sizes, dim=-1)  # (b, L, .)
        attention_out = self.attention(q, k, v, context, layer_cache)  # (b, L, d_inner)
        ssm_out = self.ssm_branch(x, layer_cache)  # (b, L, d_inner), ungated
        mixed = (self.pre_avg_layernorm1(attention_out) + self.pre_avg_layernorm2(ssm_out, gate=z)) / 2
        return self.out_proj(mixed)

    def ssm_branch(self, x: torch.Tensor, layer_cache: HymbaLayerCache | None) -> torch.Tensor:
        """x (b, L, d_inner), before the conv -> y = SelectiveScan(x, Δ, A, B, C) + D x (b, L, d_inner),
        ungated; continues from, and updates, ``layer_cache``'s conv and SSM states."""
        batch, length, _ = x.shape
        # Causal depthwise conv over [previous K-1 inputs | this forward's inputs]; zeros at the start.
        if layer_cache is not None and layer_cache.conv_state is not None:
            past = layer_cache.conv_state
        else:
            past = x.new_zeros(batch, self.d_inner, self.conv_kernel - 1)
        conv_in = torch.cat([past, x.transpose(1, 2)], dim=-1)  # (b, d_inner, K-1+L)
        x = F.conv1d(conv_in, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)  # (b, d_inner, L)
        x = F.silu(x).transpose(1, 2)  # (b, L, d_inner)

        dt, B, C = self.x_proj[0](x).split([self.time_step_rank, self.state_size, self.state_size], dim=-1)
        if self.dt_layernorm is not None:
            dt, B, C = self.dt_layernorm(dt), self.B_layernorm(B), self.C_layernorm(C)  # (b, L, R|N|N)
        dt = F.linear(dt, self.dt_proj[0].weight)  # (b, L, d_inner); the bias joins in float32 below

        # The scan runs in float32 whatever the autocast, as the release's kernels do.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32, B, C = x.float(), B.float(), C.float()
            dt = F.softplus(dt.float() + self.dt_proj[0].bias.float())  # (b, L, d_inner)
            dt = dt.clamp(*self.time_step_limit)
            A = -torch.exp(self.A_log[0].float())  # (d_inner, N)
            state = layer_cache.ssm_state if layer_cache is not None else None
            if layer_cache is not None and length == 1:  # decoding: one step of the recurrence
                if state is None:
                    state = x32.new_zeros(batch, self.d_inner, self.state_size)
                y, state = selective_step(state, x32[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
                y = y[:, None]  # (b, 1, d_inner)
            else:
                y, state = selective_scan_chunked(x32, dt, A, B, C, self.chunk_size, initial_state=state)
            y = y + x32 * self.D[0].float()  # (b, L, d_inner)

        if layer_cache is not None:
            layer_cache.conv_state = conv_in[..., conv_in.shape[-1] - (self.conv_kernel - 1):].contiguous()
            layer_cache.ssm_state = state
        return y.to(x.dtype)


class HymbaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: HymbaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HymbaReleasedFFN(nn.Module):
    """The release's FFN slot: a mixture-of-experts block with a single expert (num_experts 1: no
    router, the expert always runs), so its SwiGLU weights are ``moe.experts.0.*``."""

    def __init__(self, config: HymbaConfig):
        super().__init__()
        self.experts = nn.ModuleList([HymbaMLP(config)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts[0](x)


class HymbaDecoderLayer(nn.Module):
    def __init__(self, config: HymbaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = HymbaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = HymbaHybridMixer(config, layer_idx)
        self.pre_mlp_layernorm = HymbaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = HymbaMLP(config)
        self.layer_idx = layer_idx

    def forward(self, hidden_states, context: ForwardContext, cache: HymbaCache | None) -> torch.Tensor:
        layer_cache = cache.layers[self.layer_idx] if cache is not None else None
        hidden_states = hidden_states + self.mixer(self.input_layernorm(hidden_states), context, layer_cache)
        return hidden_states + self.mlp(self.pre_mlp_layernorm(hidden_states))


class HymbaMamba1DecoderLayer(nn.Module):
    """The layer of ``ssm_type="mamba1"``, under the release's names: x = x + mamba(input_layernorm(x)),
    then x = x + moe(pre_moe_layernorm(x))."""

    def __init__(self, config: HymbaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = HymbaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mamba = HymbaMamba1Mixer(config, layer_idx)
        self.pre_moe_layernorm = HymbaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.moe = HymbaReleasedFFN(config)
        self.layer_idx = layer_idx

    def forward(self, hidden_states, context: ForwardContext, cache: HymbaCache | None) -> torch.Tensor:
        layer_cache = cache.layers[self.layer_idx] if cache is not None else None
        hidden_states = hidden_states + self.mamba(self.input_layernorm(hidden_states), context, layer_cache)
        return hidden_states + self.moe(self.pre_moe_layernorm(hidden_states))


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


class HymbaPreTrainedModel(PreTrainedModel):
    config: HymbaConfig
    config_class = HymbaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["HymbaDecoderLayer", "HymbaMamba1DecoderLayer"]
    _is_stateful = True  # the SSM state cannot be rolled back: no assisted decoding

    def _initialize_weights(self, module, is_custom_code: bool = False):
        # transformers skips a custom-code module whose own parameters are all loaded, which is every
        # module with no parameters of its own (the Mamba-1 mixer keeps A_log, D, x_proj and dt_proj
        # in one-element lists, as the release does). _init_weights writes only through
        # transformers.initialization, which leaves loaded tensors alone, so it may always run.
        super()._initialize_weights(module, is_custom_code=False)

    def _init_weights(self, module):
        super()._init_weights(module)  # Linear / Conv1d ~ N(0, initializer_range), norms = 1
        config = self.config
        if isinstance(module, HymbaSSM):
            # Mamba-2's init: A = -(1..H), D = 1, Δ log-uniform in [time_step_min, time_step_max].
            init.copy_(module.A_log, torch.log(torch.arange(1, module.num_heads + 1, dtype=torch.float32)))
            init.ones_(module.D)
            dt = torch.exp(torch.rand(module.num_heads) * (math.log(config.time_step_max) - math.log(config.time_step_min))
                           + math.log(config.time_step_min)).clamp(min=config.time_step_floor)
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        elif isinstance(module, HymbaMamba1Mixer):
            # Mamba-1's init: A = -(1..N) in every channel, D = 1, dt_proj ~ U(±R^-1/2), Δ's bias the
            # inverse softplus of a log-uniform Δ in [time_step_min, time_step_max].
            A = torch.arange(1, module.state_size + 1, dtype=torch.float32).expand(module.d_inner, -1)
            init.copy_(module.A_log[0], torch.log(A))
            init.ones_(module.D[0])
            bound = module.time_step_rank ** -0.5
            init.uniform_(module.dt_proj[0].weight, -bound, bound)
            low, high = math.log(config.time_step_min), math.log(config.time_step_max)
            dt = torch.exp(torch.rand(module.d_inner) * (high - low) + low).clamp(min=config.time_step_floor)
            init.copy_(module.dt_proj[0].bias, dt + torch.log(-torch.expm1(-dt)))
        elif isinstance(module, HymbaModel) and module.meta_token_embeddings is not None:
            init.normal_(module.meta_token_embeddings, mean=0.0, std=config.initializer_range)


class HymbaModel(HymbaPreTrainedModel):
    def __init__(self, config: HymbaConfig):
        super().__init__(config)
        problems = config_problems(config)
        if problems:
            raise ValueError("cannot build Hymba: " + "; ".join(f"{k}: {v}" for k, v in problems.items()))
        # ssm_type mamba1 names these two as the release does (like the rest of its layout), so a
        # released checkpoint loads key for key; the factory's own names otherwise.
        released = config.ssm_type == "mamba1"
        self.meta_tokens_name = "memory_tokens" if released else "meta_tokens"
        self.final_norm_name = "final_layernorm" if released else "norm"
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # (num_meta_tokens, hidden): learned, prepended once per sequence
        meta_tokens = nn.Parameter(torch.zeros(config.num_meta_tokens, config.hidden_size)) \
            if config.num_meta_tokens else None
        setattr(self, self.meta_tokens_name, meta_tokens)
        layer_class = HymbaMamba1DecoderLayer if released else HymbaDecoderLayer
        self.layers = nn.ModuleList(layer_class(config, i) for i in range(config.num_hidden_layers))
        setattr(self, self.final_norm_name, HymbaRMSNorm(config.hidden_size, config.rms_norm_eps))
        self.post_init()

    @property
    def meta_token_embeddings(self) -> nn.Parameter | None:
        """The meta tokens (num_meta_tokens, hidden): ``meta_tokens``, or the release's ``memory_tokens``."""
        return getattr(self, self.meta_tokens_name)

    @property
    def final_norm(self) -> HymbaRMSNorm:
        """The norm before the LM head: ``norm``, or the release's ``final_layernorm``."""
        return getattr(self, self.final_norm_name)

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, inputs_embeds=None, cache: HymbaCache | None = None,
                use_cache: bool = False) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (b, L, D)
        batch, length = hidden_states.shape[:2]
        if length == 0:
            raise ValueError("Hymba got an empty sequence")
        if use_cache and cache is None:
            cache = HymbaCache(self.config)

        # Meta tokens lead every sequence: prepend them unless the cache already holds them.
        first_forward = cache is None or cache.seen_tokens == 0
        num_meta = self.config.num_meta_tokens if first_forward else 0
        if num_meta:
            meta = self.meta_token_embeddings.to(hidden_states.dtype).expand(batch, -1, -1)  # (b, M, D)
            hidden_states = torch.cat([meta, hidden_states], dim=1)  # (b, M+L, D)
        start = 0 if first_forward else self.config.num_meta_tokens + cache.seen_tokens
        positions = torch.arange(start, start + hidden_states.shape[1], device=hidden_states.device)
        cos, sin = rotary_tables(positions, self.config.head_dim, rope_base(self.config))
        context = ForwardContext(positions, cos, sin, num_meta=self.config.num_meta_tokens)

        for layer in self.layers:
            hidden_states = layer(hidden_states, context, cache)
        hidden_states = self.final_norm(hidden_states)[:, num_meta:]  # drop the meta tokens: (b, L, D)
        if cache is not None:
            cache.seen_tokens += length
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


class HymbaForCausalLM(HymbaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HymbaConfig):
        super().__init__(config)
        self.model = HymbaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build a DynamicCache: the forward creates a HymbaCache

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: HymbaCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits for input_ids (b, L); with ``use_cache`` (the default in eval mode) also the
        HymbaCache to continue from. ``labels`` (b, L) gives the mean next-token loss (-100 is
        ignored). ``attention_mask`` is accepted for generate() and must be all ones."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("Hymba does not support padded batches: meta tokens lead every sequence and the "
                             "window masks count positions. Pass sequences of equal length, or one at a time.")
        if cache is not None and not isinstance(cache, HymbaCache):
            raise TypeError(f"Hymba needs a HymbaCache, got {type(cache).__name__}")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        outputs = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, cache=cache, use_cache=use_cache)
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)  # (b, L', vocab)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)
        return output if return_dict is not False else output.to_tuple()


__all__ = ["HymbaCache", "HymbaForCausalLM", "HymbaModel", "HymbaPreTrainedModel", "rope_base",
           "selective_scan_chunked", "selective_scan_ref", "selective_step", "ssd_chunked", "ssd_step"]
