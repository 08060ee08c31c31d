"""Hymba: the SSD math, cached decoding, KV sharing, the sliding window with meta tokens,
configs, and training. CPU only, the `micro` preset unless a test says otherwise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flows.recipe import RecipeError, parse_recipe
from model.hymba import PRESETS, HymbaConfig, HymbaForCausalLM, build_config, cache_bytes, summarize
from model.hymba.configuration_hymba import config_problems
from model.hymba.modeling_hymba import (
    ForwardContext,
    HymbaAttention,
    HymbaCache,
    rotary_tables,
    ssd_chunked,
    ssd_step,
)

from .conftest import recipe_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny forwards: extra OpenMP threads only wait

# docs/architectures.md 2.1: kv_reuse_group of nvidia/Hymba-1.5B-Base
PUBLISHED_KV_GROUPS = [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14], [16, 17, 18], [19, 20],
                       [21, 22], [23, 24], [25, 26], [27, 28], [29, 30]]


def micro_model(seed: int = 0, **overrides) -> HymbaForCausalLM:
    # A larger init spread than the default 0.02, so logits differ enough for equality checks to bite.
    torch.manual_seed(seed)
    return HymbaForCausalLM(build_config("micro", {"initializer_range": 0.1} | overrides)).eval()


# ---------------------------------------------------------------------------------- SSD math


@pytest.mark.parametrize("chunk_size", [4, 16, 64])  # several chunks, a ragged tail, one chunk longer than T
def test_chunked_ssd_equals_token_by_token_recurrence(chunk_size):
    torch.manual_seed(0)
    b, T, h, p, n = 2, 37, 4, 3, 5
    x, B, C = torch.randn(b, T, h, p), torch.randn(b, T, h, n), torch.randn(b, T, h, n)
    dt, A = torch.rand(b, T, h) * 0.5, -torch.rand(h) - 0.1
    initial = torch.randn(b, h, p, n)

    y, final = ssd_chunked(x * dt[..., None], A * dt, B, C, chunk_size, initial_state=initial)

    state, steps = initial, []
    for t in range(T):
        y_t, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        steps.append(y_t)
    torch.testing.assert_close(y, torch.stack(steps, dim=1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, state, rtol=1e-4, atol=1e-4)


def test_chunked_ssd_is_stable_over_long_decays():
    # exp of a plain difference of cumsums overflows here; the masked segsum does not.
    b, T, h, p, n = 1, 256, 2, 2, 2
    x, B, C = torch.randn(b, T, h, p), torch.randn(b, T, h, n), torch.randn(b, T, h, n)
    dt, A = torch.full((b, T, h), 5.0), torch.full((h,), -20.0)
    y, final = ssd_chunked(x * dt[..., None], A * dt, B, C, chunk_size=256)
    assert torch.isfinite(y).all() and torch.isfinite(final).all()


# ------------------------------------------------------------------------ cached decoding


def test_cached_decoding_equals_full_forward_across_the_window_with_meta_tokens():
    model = micro_model()
    config = model.config
    ids = torch.randint(0, config.vocab_size, (2, 30))
    assert 30 > 2 * config.sliding_window  # decoding crosses the window boundary twice
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits  # (2, 30, V)
        # prefill 5, then a 4-token chunk, then one token at a time
        out = model(input_ids=ids[:, :5], use_cache=True)
        torch.testing.assert_close(out.logits, full[:, :5], rtol=1e-4, atol=1e-4)
        out = model(input_ids=ids[:, 5:9], cache=out.cache)
        torch.testing.assert_close(out.logits, full[:, 5:9], rtol=1e-4, atol=1e-4)
        cache = out.cache
        for t in range(9, 30):
            out = model(input_ids=ids[:, t : t + 1], cache=cache)
            torch.testing.assert_close(out.logits[:, 0], full[:, t], rtol=1e-4, atol=1e-4, msg=f"token {t}")
    assert cache.get_seq_length() == 30  # text tokens; the meta tokens are not counted


def test_generate_with_cache_equals_greedy_decoding_without_it():
    model = micro_model()
    prompt = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=20, do_sample=False)
        ids = prompt
        for _ in range(20):  # greedy by full forwards, no cache at all
            next_id = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert generated.tolist() == ids.tolist()


def test_beam_search_reorders_the_cache():
    model = micro_model()
    prompts = torch.randint(0, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        cached = model.generate(prompts, max_new_tokens=8, num_beams=2, do_sample=False)
        uncached = model.generate(prompts, max_new_tokens=8, num_beams=2, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_logits_to_keep_and_labels():
    model = micro_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(input_ids=ids, labels=ids, use_cache=False)
        last = model(input_ids=ids, logits_to_keep=1, use_cache=False).logits
    torch.testing.assert_close(last[:, 0], full.logits[:, -1])
    expected = F.cross_entropy(full.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(full.loss, expected)


def test_padded_batches_are_rejected():
    model = micro_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with pytest.raises(ValueError, match="padded"):
        model(input_ids=ids, attention_mask=mask)


# ------------------------------------------------------------------ KV sharing and windows


def test_kv_consumer_layers_allocate_no_cache_and_compute_no_keys():
    model = micro_model()
    config = model.config
    consumers = [i for i in range(config.num_hidden_layers) if config.kv_producer(i) != i]
    assert consumers == [4]  # GWGWwG
    with torch.no_grad():
        cache = model(input_ids=torch.randint(0, config.vocab_size, (1, 20)), use_cache=True).cache
    for i, layer in enumerate(cache.layers):
        if i in consumers:
            assert layer.keys is None and layer.values is None
        else:
            assert layer.keys is not None
        assert layer.ssm_state is not None  # every layer has SSM heads
    producer_rows = model.model.layers[3].mixer.in_proj.weight.shape[0]
    consumer_rows = model.model.layers[4].mixer.in_proj.weight.shape[0]
    assert producer_rows - consumer_rows == config.num_key_value_heads * (config.head_dim + config.v_head_dim)
    # Everything the cache holds, to the byte (fp32 model: 4-byte K/V and conv inputs).
    assert cache.cache_bytes() == cache_bytes(config, 20, kv_bytes=4, state_bytes=4)


def test_window_caches_stop_growing_at_meta_tokens_plus_window():
    model = micro_model()
    config = model.config
    meta, window = config.num_meta_tokens, config.sliding_window
    ids = torch.randint(0, config.vocab_size, (1, 3 * window))
    with torch.no_grad():
        cache = model(input_ids=ids[:, :2], use_cache=True).cache
        for t in range(2, ids.shape[1]):
            model(input_ids=ids[:, t : t + 1], cache=cache)
            seen = t + 1
            window_layer, global_layer = cache.layers[1], cache.layers[0]
            # The next token attends to these plus itself: meta tokens and a window of W positions.
            assert window_layer.keys.shape[2] == meta + min(seen, window - 1)
            assert global_layer.keys.shape[2] == meta + seen
    assert window_layer.key_positions[:meta].tolist() == list(range(meta))  # the meta tokens stay
    assert window_layer.key_positions[meta:].tolist() == list(range(meta + seen - window + 1, meta + seen))


def test_meta_tokens_are_attended_by_the_last_token_beyond_the_window():
    config = build_config("micro")
    meta, window = config.num_meta_tokens, config.sliding_window
    layer = 1
    assert config.layer_window(layer) == window and config.kv_producer(layer) == layer
    attention = HymbaAttention(config, layer_idx=layer).eval()
    length = meta + 4 * window  # positions 0..M-1 are meta tokens, the rest text
    positions = torch.arange(length)
    torch.manual_seed(0)
    q = torch.randn(1, length, config.num_attention_heads * config.head_dim)
    k = torch.randn(1, length, config.num_key_value_heads * config.head_dim)
    v = torch.randn(1, length, config.num_key_value_heads * config.v_head_dim)

    def last_output(values):
        context = ForwardContext(positions, *rotary_tables(positions, config.head_dim, config.rope_theta), meta)
        return attention(q, k, values, context, layer_cache=None)[0, -1]

    base = last_output(v)
    changed_meta, changed_far, changed_near = v.clone(), v.clone(), v.clone()
    changed_meta[:, 0] += 10.0  # the first meta token
    changed_far[:, length - window - 1] += 10.0  # the last text position outside the window
    changed_near[:, length - window] += 10.0  # the first position inside it (W positions, its own included)
    assert not torch.allclose(last_output(changed_meta), base, atol=1e-3)
    torch.testing.assert_close(last_output(changed_far), base)
    assert not torch.allclose(last_output(changed_near), base, atol=1e-3)


# --------------------------------------------------------------------------- configuration


def test_published_shape():
    config = build_config("hymba-1.5b")
    assert config.global_attn_layers == [0, 15, 31]
    assert config.kv_reuse_groups == PUBLISHED_KV_GROUPS
    producers = [i for i in range(32) if config.kv_producer(i) == i]
    assert len(producers) == 17  # 3 global + 14 window
    summary = summarize(config)
    assert 1.45e9 < summary["parameters"] < 1.55e9  # the release: 1.52B with Mamba-1 heads
    assert summary["parameters_by_kind"]["meta_tokens"] == 128 * 1600
    assert "lm_head" not in summary["parameters_by_kind"]  # tied to the embedding
    assert summary["layer_pattern"] == "G" + "Ww" * 7 + "GWww" + "Ww" * 6 + "G"


def test_published_config_names_are_accepted():
    config = HymbaConfig(num_memory_tokens=64, global_attn_idx=[0, 5], kv_reuse_group=[[1, 2]],
                         mamba_d_state=8, num_hidden_layers=6)
    assert (config.num_meta_tokens, config.global_attn_layers, config.kv_reuse_groups, config.ssm_state_size) == (
        64, [0, 5], [[1, 2]], 8)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_are_valid(preset):
    assert config_problems(build_config(preset)) == {}


BAD_CONFIGS = [
    ({"v_head_dim": 8}, "v_head_dim"),  # attention width 32 != SSM width 64
    ({"mamba_num_heads": 3, "mamba_head_dim": 16, "v_head_dim": 12}, "mamba_num_heads"),  # 2 groups
    ({"num_attention_heads": 3}, "num_attention_heads"),  # 2 KV heads
    ({"kv_reuse_groups": [[1, 3]]}, "kv_reuse_groups"),  # not consecutive
    ({"kv_reuse_groups": [[1, 2]]}, "kv_reuse_groups"),  # 2 is a global layer, 1 a window layer
    ({"global_attn_layers": [0, 9]}, "global_attn_layers"),
    ({"head_dim": 15}, "head_dim"),
]


@pytest.mark.parametrize("overrides, field", BAD_CONFIGS, ids=[f for _, f in BAD_CONFIGS])
def test_bad_shapes_are_named_before_any_compute(corpus_dir, overrides, field):
    config = build_config("micro", overrides)
    assert field in config_problems(config)
    with pytest.raises(ValueError, match=field):
        HymbaForCausalLM(config)
    with pytest.raises(RecipeError) as info:
        parse_recipe(recipe_dict(corpus_dir, model={"family": "hymba", "preset": "micro", "overrides": overrides}))
    assert f"model.overrides.{field}" in [p for p, _ in info.value.problems]


def test_cache_object_is_what_generate_expects():
    model = micro_model()
    cache = HymbaCache(model.config)
    prompt = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=3, do_sample=False, cache=cache)
    assert cache.get_seq_length() == 5 + 2  # the last generated token is never fed back
    assert out.shape == (1, 8)


# -------------------------------------------------------------------------------- training


def test_training_decreases_loss_on_the_tiny_preset():
    torch.manual_seed(0)
    model = HymbaForCausalLM(build_config("tiny")).train()
    text = (torch.arange(64) % 23 + 100).repeat(4)  # a periodic "text" the model can learn quickly
    ids = torch.stack([text[i : i + 64] for i in range(0, 32, 8)])  # (4, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
