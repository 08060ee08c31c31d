"""Hymba in the release's layout (`ssm_type: mamba1`): a tiny checkpoint written under the state-dict
names and shapes of nvidia/Hymba-1.5B-Base's modeling code, with a config.json in the release's
fields, loads into the factory's class key for key and computes what the release's forward
computes; the Mamba-1 scan's fast path equals the reference; cached decoding equals the full
forward. Also the NTK RoPE and full-width SSM norm fields. CPU only, tiny shapes."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from model.hymba import (
    HymbaConfig,
    HymbaForCausalLM,
    build_config,
    cache_bytes,
    parameters_by_kind,
    summarize,
)
from model.hymba.configuration_hymba import config_problems
from model.hymba.modeling_hymba import rope_base, selective_scan_chunked, selective_scan_ref, selective_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny forwards: extra OpenMP threads only wait

# A tiny config.json in the release's own fields (its HymbaConfig), as nvidia/Hymba-1.5B-Base's is
# written: 4 layers, global attention in 0 and 3, window layers 1 and 2 sharing layer 1's K/V.
RELEASED_CONFIG = {
    "model_type": "hymba", "architectures": ["HymbaForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_hymba.HymbaConfig",
                 "AutoModelForCausalLM": "modeling_hymba.HymbaForCausalLM"},
    "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "attn_hidden_size": -1, "kq_head_dim": -1,
    "v_head_dim": 16, "kq_norm": "none", "rope": True, "rope_type": "ntk", "rope_theta": 10000.0,
    "orig_max_position_embeddings": 32, "max_position_embeddings": 128,
    "mamba_expand": 2, "mamba_d_state": 4, "mamba_d_conv": 4, "mamba_dt_rank": 3, "mamba_conv_bias": True,
    "mamba_proj_bias": False, "mamba_inner_layernorms": True, "num_mamba": 1, "hidden_act": "silu",
    "mlp_hidden_act": "silu", "num_experts": 1, "num_experts_per_tok": 1,
    "num_memory_tokens": 3, "memory_tokens_interspersed_every": 0, "sliding_window": 5,
    "global_attn_idx": [0, 3], "kv_reuse_group": [[1, 2]], "kv_reuse_every_i_layer": -1,
    "kv_weight_reuse": False, "attn_implementation": "flex", "attn_implementation_new": "flex",
    "layer_type": ["h"] * 4, "conv_dim": {str(i): 64 for i in range(4)}, "seq_length": 64,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "use_cache": False, "torch_dtype": "bfloat16", "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}
MEMORY, WINDOW, HEADS, KV_HEADS, HEAD_DIM, D_INNER, DT_RANK, D_STATE = 3, 5, 4, 2, 8, 64, 3, 4

# The state dict of the release's HymbaForCausalLM for RELEASED_CONFIG, read off its modeling code
# (HymbaModel, HymbaDecoderLayer, HymbaBlock, HymbaSparseMoeBlock; the tied LM head is not saved):
#   q is hidden wide (attn_hidden_size = hidden 32: 4 heads x head_dim 8); k = kv/heads x hidden = 16;
#   v = kv/heads x hidden x mamba_expand = 32 (v_head_dim = d_inner / heads = 16); d_inner = 2 x 32 = 64.
MODEL_KEYS = {"model.embed_tokens.weight": (96, 32), "model.memory_tokens": (3, 32),
              "model.final_layernorm.weight": (32,)}
LAYER_KEYS = {  # under model.layers.{i}.
    "input_layernorm.weight": (32,),
    "mamba.in_proj.weight": (208, 32),  # latent_dim (q 32 + k 16 + v 32 + x 64) + gate 64
    "mamba.out_proj.weight": (32, 64),
    "mamba.conv1d.weight": (64, 1, 4), "mamba.conv1d.bias": (64,),  # depthwise over x, d_conv 4
    "mamba.x_proj.0.weight": (11, 64),  # dt_rank 3 + 2 x d_state 4
    "mamba.dt_proj.0.weight": (64, 3), "mamba.dt_proj.0.bias": (64,),
    "mamba.A_log.0": (64, 4), "mamba.D.0": (64,),  # per channel (and state)
    "mamba.dt_layernorm.weight": (3,), "mamba.B_layernorm.weight": (4,), "mamba.C_layernorm.weight": (4,),
    "mamba.pre_avg_layernorm1.weight": (64,), "mamba.pre_avg_layernorm2.weight": (64,),
    "pre_moe_layernorm.weight": (32,),
    "moe.experts.0.gate_proj.weight": (48, 32), "moe.experts.0.up_proj.weight": (48, 32),
    "moe.experts.0.down_proj.weight": (32, 48),
}
CONSUMER_IN_PROJ = (160, 32)  # layer 2 reuses layer 1's K/V: latent_dim q 32 + x 64, then gate 64


def released_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values under the release's names and shapes, in ranges a trained model has."""
    generator = torch.Generator().manual_seed(seed)
    shapes = dict(MODEL_KEYS)
    for layer in range(4):
        shapes |= {f"model.layers.{layer}.{name}": shape for name, shape in LAYER_KEYS.items()}
    shapes["model.layers.2.mamba.in_proj.weight"] = CONSUMER_IN_PROJ
    tensors = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        if "norm" in name:
            tensors[name] = 1 + 0.2 * noise
        elif name.endswith("A_log.0"):
            tensors[name] = torch.log(torch.rand(shape, generator=generator) * 4 + 0.5)
        elif name.endswith("dt_proj.0.bias"):
            tensors[name] = 0.5 * noise - 3.0  # softplus: Δ around 0.05
        elif name.endswith("memory_tokens") or name.endswith("D.0"):
            tensors[name] = noise
        else:
            tensors[name] = noise * (0.8 / math.sqrt(shape[-1] * (shape[-2] if len(shape) == 3 else 1)))
    return tensors


@pytest.fixture
def released_checkpoint(tmp_path):
    folder = tmp_path / "hymba-released-tiny"
    folder.mkdir()
    tensors = released_state_dict()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(RELEASED_CONFIG))
    return folder, tensors


def released_logits(t: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """The release's forward for RELEASED_CONFIG, restated naively over the raw tensors from its
    modeling code (flex-attention prefill, no cache): memory tokens prepended; per layer in_proj ->
    q | k | v | x | gate; NTK RoPE; causal attention, window layers limited to q - k <= W except
    the memory tokens; Mamba-1 scanned step by step; the two branch norms averaged; a one-expert MoE."""
    batch, length = ids.shape
    total = MEMORY + length

    def rms(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    base = 10000.0 * (2 * 128 / 32 - 1) ** (HEAD_DIM / (HEAD_DIM - 2))  # LlamaRotaryEmbedding, rope_type ntk
    angles = torch.arange(total)[:, None] * (1.0 / base ** (torch.arange(0, HEAD_DIM, 2) / HEAD_DIM))
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(x):  # (b, heads, T, head_dim), rotate_half
        return x * cos + torch.cat([-x[..., HEAD_DIM // 2:], x[..., : HEAD_DIM // 2]], -1) * sin

    query, key = torch.arange(total)[:, None], torch.arange(total)[None, :]
    memory = t["model.memory_tokens"].expand(batch, -1, -1)
    hidden = torch.cat([memory, t["model.embed_tokens.weight"][ids]], dim=1)  # (b, M + L, hidden)
    shared_kv = {}
    for layer in range(4):
        prefix = f"model.layers.{layer}."
        w = {name: t[prefix + name] for name in LAYER_KEYS if prefix + name in t}
        u = rms(hidden, w["input_layernorm.weight"])
        latent_and_gate = u @ w["mamba.in_proj.weight"].T
        latent, gate = latent_and_gate[..., :-D_INNER], latent_and_gate[..., -D_INNER:]
        if layer == 2:  # a consumer of layer 1's K/V
            q, x = latent.split([32, D_INNER], dim=-1)
            k, v = shared_kv[1]
        else:
            q, k, v, x = latent.split([32, 16, 32, D_INNER], dim=-1)
            k = rope(k.view(batch, total, KV_HEADS, HEAD_DIM).transpose(1, 2))
            v = v.view(batch, total, KV_HEADS, 16).transpose(1, 2)
            shared_kv[layer] = (k, v)
        q = rope(q.view(batch, total, HEADS, HEAD_DIM).transpose(1, 2))
        groups = HEADS // KV_HEADS
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)  # repeat_kv
        allowed = (query >= key) & ((layer in (0, 3)) | (query - key <= WINDOW) | (key < MEMORY))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)).masked_fill(~allowed, -math.inf)
        attention = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, total, D_INNER)

        x = F.conv1d(x.transpose(1, 2), w["mamba.conv1d.weight"], w["mamba.conv1d.bias"], padding=3,
                     groups=D_INNER)
        x = F.silu(x[..., :total]).transpose(1, 2)  # (b, T, d_inner)
        dt, B, C = (x @ w["mamba.x_proj.0.weight"].T).split([DT_RANK, D_STATE, D_STATE], dim=-1)
        dt, B, C = (rms(dt, w["mamba.dt_layernorm.weight"]), rms(B, w["mamba.B_layernorm.weight"]),
                    rms(C, w["mamba.C_layernorm.weight"]))
        delta = F.softplus(dt @ w["mamba.dt_proj.0.weight"].T + w["mamba.dt_proj.0.bias"])  # (b, T, d_inner)
        A = -torch.exp(w["mamba.A_log.0"])
        state, ys = torch.zeros(batch, D_INNER, D_STATE), []
        for s in range(total):  # selective_scan_fn: h = exp(Δ A) h + Δ B x; y = C h + D x; y * silu(z)
            decay = torch.exp(delta[:, s, :, None] * A)
            state = decay * state + (delta[:, s] * x[:, s])[..., None] * B[:, s, None, :]
            ys.append((state * C[:, s, None, :]).sum(-1))
        y = (torch.stack(ys, 1) + x * w["mamba.D.0"]) * F.silu(gate)

        mixed = (rms(attention, w["mamba.pre_avg_layernorm1.weight"])
                 + rms(y, w["mamba.pre_avg_layernorm2.weight"])) / 2
        hidden = hidden + mixed @ w["mamba.out_proj.weight"].T
        f = rms(hidden, w["pre_moe_layernorm.weight"])
        expert = "moe.experts.0."
        swiglu = F.silu(f @ w[expert + "gate_proj.weight"].T) * (f @ w[expert + "up_proj.weight"].T)
        hidden = hidden + swiglu @ w[expert + "down_proj.weight"].T
    hidden = rms(hidden, t["model.final_layernorm.weight"])[:, MEMORY:]
    return hidden @ t["model.embed_tokens.weight"].T  # tied LM head


def load_released(folder) -> HymbaForCausalLM:
    model, info = HymbaForCausalLM.from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
    assert info["missing_keys"] == info["unexpected_keys"] == info["mismatched_keys"] == set()
    return model.eval()


# ------------------------------------------------------------------------- the released layout


def test_released_checkpoint_loads_key_for_key(released_checkpoint):
    folder, tensors = released_checkpoint
    model = load_released(folder)
    config = model.config
    # The release's config.json in the factory's terms.
    assert (config.ssm_type, config.ssm_norm, config.head_dim, config.v_head_dim, config.time_step_rank) == (
        "mamba1", "full", 8, 16, 3)
    assert config.mamba_num_heads * config.mamba_head_dim == D_INNER
    assert (config.num_meta_tokens, config.global_attn_layers, config.kv_reuse_groups) == (
        3, [0, 3], [[1, 2]])
    assert config.sliding_window == WINDOW + 1  # the release's q - k <= W: W + 1 positions with the query
    assert (config.rope_type, config.orig_max_position_embeddings) == ("ntk", 32)
    assert config.layer_pattern == "GWwG"

    state = model.state_dict()
    assert set(state) == set(tensors) | {"lm_head.weight"}
    for name, value in tensors.items():
        assert state[name].shape == value.shape and torch.equal(state[name], value), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied


def test_released_checkpoint_computes_the_release_forward(released_checkpoint):
    folder, tensors = released_checkpoint
    model = load_released(folder)
    ids = torch.randint(0, 96, (2, 14), generator=torch.Generator().manual_seed(1))
    assert ids.shape[1] > 2 * WINDOW  # the window and the memory-token exception both matter
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(logits, released_logits(tensors, ids), rtol=1e-4, atol=1e-4)


def test_mamba1_cached_decoding_equals_the_full_forward(released_checkpoint):
    model = load_released(released_checkpoint[0])
    ids = torch.randint(0, 96, (2, 15), generator=torch.Generator().manual_seed(2))
    assert ids.shape[1] > 2 * (WINDOW + 1)  # decoding crosses the window boundary twice
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits  # (2, 15, V)
        out = model(input_ids=ids[:, :4], use_cache=True)  # prefill 4, a 3-token chunk, then one at a time
        torch.testing.assert_close(out.logits, full[:, :4], rtol=1e-4, atol=1e-4)
        out = model(input_ids=ids[:, 4:7], cache=out.cache)
        torch.testing.assert_close(out.logits, full[:, 4:7], rtol=1e-4, atol=1e-4)
        cache = out.cache
        for t in range(7, 15):
            out = model(input_ids=ids[:, t : t + 1], cache=cache)
            torch.testing.assert_close(out.logits[:, 0], full[:, t], rtol=1e-4, atol=1e-4, msg=f"token {t}")
    layer = cache.layers[0]
    assert layer.conv_state.shape == (2, D_INNER, 3) and layer.ssm_state.shape == (2, D_INNER, D_STATE)
    assert cache.layers[2].keys is None  # the KV consumer holds no K/V
    assert cache.layers[1].keys.shape[2] == MEMORY + WINDOW  # memory tokens + the last W of a W + 1 window
    assert cache.cache_bytes() == 2 * cache_bytes(model.config, 15, kv_bytes=4, state_bytes=4)  # per sequence


def test_mamba1_generate_with_cache_equals_greedy_decoding_without_it(released_checkpoint):
    model = load_released(released_checkpoint[0])
    prompt = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        ids = prompt
        for _ in range(6):
            next_id = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert generated.tolist() == ids.tolist()


def test_a_factory_mamba1_checkpoint_is_saved_in_the_released_layout(tmp_path):
    torch.manual_seed(0)
    model = HymbaForCausalLM(build_config("micro", {"ssm_type": "mamba1", "initializer_range": 0.1})).eval()
    model.save_pretrained(tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"model.memory_tokens", "model.final_layernorm.weight", "model.layers.4.mamba.x_proj.0.weight",
            "model.layers.0.moe.experts.0.down_proj.weight", "model.layers.0.mamba.A_log.0"} <= keys
    assert not any(".mixer." in k or ".mlp." in k or "meta_tokens" in k for k in keys)
    reloaded = HymbaForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert reloaded.config.sliding_window == model.config.sliding_window  # no second W + 1
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_mamba1_init_is_mamba1s():
    torch.manual_seed(0)
    mixer = HymbaForCausalLM(build_config("micro", {"ssm_type": "mamba1"})).model.layers[0].mamba
    state_size = mixer.state_size
    expected_A = -torch.arange(1, state_size + 1.0).expand(mixer.d_inner, -1)
    torch.testing.assert_close(-torch.exp(mixer.A_log[0]), expected_A)
    assert torch.equal(mixer.D[0], torch.ones(mixer.d_inner))
    dt = F.softplus(mixer.dt_proj[0].bias)
    assert 0.9e-3 <= dt.min() and dt.max() <= 0.11  # time_step_min .. time_step_max
    assert torch.equal(mixer.dt_layernorm.weight, torch.ones(mixer.time_step_rank))


def test_every_mamba1_parameter_trains():
    torch.manual_seed(0)
    model = HymbaForCausalLM(build_config("micro", {"ssm_type": "mamba1"})).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    model(input_ids=ids, labels=ids).loss.backward()  # 24 positions: the chunked scan's carry too (chunk 16)
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_released_options_the_factory_lacks_are_refused():
    with pytest.raises(ValueError, match="kq_norm"):
        HymbaConfig(**(RELEASED_CONFIG | {"kq_norm": "rms"}))
    with pytest.raises(ValueError, match="num_experts"):
        HymbaConfig(**(RELEASED_CONFIG | {"num_experts": 4}))


def test_published_shape_with_mamba1_heads_has_the_release_parameter_count():
    config = build_config("hymba-1.5b", {"ssm_type": "mamba1"})
    by_kind = parameters_by_kind(config)
    with torch.device("meta"):
        model = HymbaForCausalLM(config)
    assert sum(by_kind.values()) == sum(p.numel() for p in model.parameters())  # the tied head once
    assert 1.52e9 < sum(by_kind.values()) < 1.525e9  # docs/architectures.md 2.1: the release's 1.52B
    assert config.time_step_rank == 100 and summarize(config)["config"]["ssm_type"] == "mamba1"


# ----------------------------------------------------------------------- the Mamba-1 scan


@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])  # many chunks, a ragged tail, one chunk longer than T
def test_chunked_selective_scan_equals_the_reference(chunk_size):
    torch.manual_seed(0)
    b, T, d, n = 2, 37, 6, 5
    x, dt = torch.randn(b, T, d), torch.rand(b, T, d) * 0.5
    A, B, C = -torch.rand(d, n) * 2 - 0.1, torch.randn(b, T, n), torch.randn(b, T, n)
    initial = torch.randn(b, d, n)
    y_ref, state_ref = selective_scan_ref(x, dt, A, B, C, initial_state=initial)
    y, state = selective_scan_chunked(x, dt, A, B, C, chunk_size, initial_state=initial)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, state_ref, rtol=1e-5, atol=1e-5)
    # The reference is selective_step at every position: the recurrence written out once more.
    h = initial
    for t in range(3):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        torch.testing.assert_close(y_ref[:, t], (h * C[:, t, None, :]).sum(-1))
    first, _ = selective_step(initial, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    torch.testing.assert_close(first, y_ref[:, 0])


def test_chunked_selective_scan_is_stable_over_long_decays():
    b, T, d, n = 1, 300, 2, 2
    x, B, C = torch.randn(b, T, d), torch.randn(b, T, n), torch.randn(b, T, n)
    dt, A = torch.full((b, T, d), 5.0), torch.full((d, n), -20.0)
    y, state = selective_scan_chunked(x, dt, A, B, C, chunk_size=128)
    assert torch.isfinite(y).all() and torch.isfinite(state).all()
    torch.testing.assert_close(y, selective_scan_ref(x, dt, A, B, C)[0])


# ----------------------------------------------------- NTK RoPE and the full-width SSM norm


def test_ntk_rope_is_off_by_default_and_the_release_base_when_on():
    default = build_config("hymba-1.5b")
    assert default.rope_type == "default" and rope_base(default) == default.rope_theta
    ntk = build_config("hymba-1.5b", {"rope_type": "ntk", "orig_max_position_embeddings": 2048})
    # 10000 * (2 * 8192 / 2048 - 1) ** (64 / 62): the release's 2K -> 8K stretch
    assert rope_base(ntk) == pytest.approx(10000 * 7 ** (64 / 62)) and 74_000 < rope_base(ntk) < 75_000
    assert "orig_max_position_embeddings" in config_problems(build_config("micro", {"rope_type": "ntk"}))
    assert "rope_type" in config_problems(build_config("micro", {"rope_type": "dynamic_ntk"}))


def micro_logits(overrides: dict, ids: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)
    model = HymbaForCausalLM(build_config("micro", {"initializer_range": 0.1} | overrides)).eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_ntk_rope_changes_the_output():
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    ntk = {"rope_type": "ntk", "orig_max_position_embeddings": 256}
    assert not torch.allclose(micro_logits({}, ids), micro_logits(ntk, ids), atol=1e-4)


def test_full_width_ssm_norm_is_off_by_default_and_normalises_the_whole_width():
    config = build_config("micro")
    assert config.ssm_norm == "group" and config.ssm_type == "mamba2"
    full = HymbaForCausalLM(build_config("micro", {"ssm_norm": "full"})).model.layers[0].mixer.ssm.norm
    assert full.group_size == config.mamba_num_heads * config.mamba_head_dim
    y, z = torch.randn(2, 3, full.group_size), torch.randn(2, 3, full.group_size)
    gated = y * F.silu(z)
    expected = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + full.eps)
    torch.testing.assert_close(full(y, gate=z), expected)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(micro_logits({}, ids), micro_logits({"ssm_norm": "full"}, ids), atol=1e-4)
    assert "ssm_norm" in config_problems(build_config("micro", {"ssm_type": "mamba1", "ssm_norm": "group"}))
