"""Hymba's decoding cache and decode speed against an attention-only (Llama-style) model and
Nemotron-H, at equal parameters, in one process.

    python bench/hymba_efficiency.py [--context 8192] [--decode 16] [--rounds 5] [--threads 1]

The paper (arXiv 2411.13676) reports for Hymba-1.5B against Llama-3.2-3B an 11.67x smaller
cache (79 MB vs 918 MB at 8K tokens) and 3.49x the throughput (A100, 8K, batch 128).

1. Analytic, published scale: the cache of our hymba-1.5b preset (16-bit, as the paper
   counts) against Llama-3.2-3B's shape (28 layers, 8 KV heads of 128), and what each Hymba
   trick (sliding window, KV sharing, meta tokens) contributes.
2. Measured, tiny scale (fp32, CPU, batch 1): the tiny Hymba, a Llama with the same width
   and parameter count, and the tiny Nemotron-H read a random ``--context``-token prompt,
   then decode greedily with their caches, in interleaved rounds. We report the bytes every
   cache holds after the prompt and the median decode tokens/s over the rounds.

Results go to bench/results/hymba_efficiency.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.architectures import format_parameters, get_family  # noqa: E402
from model.hymba import build_config, cache_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "hymba_efficiency.json"
MiB = 2**20

# Llama-3.2-3B (meta-llama/Llama-3.2-3B config.json): 28 layers, GQA with 8 KV heads of 128.
LLAMA_3B = dict(layers=28, kv_heads=8, head_dim=128)


def llama_cache_bytes(layers: int, kv_heads: int, head_dim: int, context: int, bytes_per_value: int = 2) -> int:
    return 2 * layers * kv_heads * head_dim * context * bytes_per_value  # K and V, every layer, every token


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    """Hymba tiny's width (256), heads (4 query, 2 KV of 64), depth (7) and tied embeddings;
    the FFN (704) brings it to the same parameter count (~6.2M)."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=704, num_hidden_layers=7,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                       max_position_embeddings=65536)


def analytic(context: int) -> dict:
    hymba = build_config("hymba-1.5b")
    n = hymba.num_hidden_layers
    variants = {
        "all global, no sharing, no meta": dict(global_attn_layers=list(range(n)), kv_reuse_groups=[], num_meta_tokens=0),
        "+ sliding window (globals 0, 15, 31)": dict(kv_reuse_groups=[], num_meta_tokens=0),
        "+ KV sharing": dict(num_meta_tokens=0),
        "+ 128 meta tokens (= hymba-1.5b)": {},
    }
    rows = {name: cache_bytes(build_config("hymba-1.5b", change), context, kv_bytes=2, state_bytes=2)
            for name, change in variants.items()}
    llama = llama_cache_bytes(**LLAMA_3B, context=context)
    full = rows["+ 128 meta tokens (= hymba-1.5b)"]
    return {"context": context, "llama_3.2_3b_bytes": llama, "hymba_1.5b_bytes": full,
            "hymba_1.5b_bytes_fp32_ssm_state": cache_bytes(hymba, context, kv_bytes=2, state_bytes=4),
            "ratio": llama / full, "hymba_variants_bytes": rows, "paper": {"llama_MB": 918, "hymba_MB": 79, "ratio": 11.67}}


def tensor_bytes(obj, seen: set) -> int:
    """Bytes of every tensor reachable from a cache layer's attributes (dicts and lists too)."""
    if torch.is_tensor(obj):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def cache_size(cache) -> int:
    seen: set = set()
    return sum(tensor_bytes(vars(layer), seen) for layer in cache.layers)


@torch.no_grad()
def read_prompt(net, context: int, prefill_chunk: int | None):
    """The model's cache after a random ``context``-token prompt, its next token, and the time it took."""
    net.eval()
    prompt = torch.randint(3, net.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    cache, step = None, prefill_chunk or context
    for start in range(0, context, step):
        out = net(input_ids=prompt[:, start : start + step], cache=cache, use_cache=True, logits_to_keep=1)
        cache = out.cache
    return cache, out.logits[:, -1].argmax(-1, keepdim=True), time.perf_counter() - started


@torch.no_grad()
def decode(net, cache, next_id: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
    """``steps`` greedy tokens with the cache; returns the last token and the seconds per token."""
    started = time.perf_counter()
    for _ in range(steps):
        next_id = net(input_ids=next_id, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    return next_id, (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--decode", type=int, default=16, help="decode steps per model per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prefill-chunk", type=int, default=1024, help="Hymba reads the prompt in chunks this long")
    args = parser.parse_args()

    paper = analytic(args.context)
    print(f"analytic, {args.context} tokens, 16-bit: Llama-3.2-3B {paper['llama_3.2_3b_bytes'] / MiB:.1f} MiB, "
          f"hymba-1.5b {paper['hymba_1.5b_bytes'] / MiB:.1f} MiB -> {paper['ratio']:.2f}x smaller (paper: 11.67x)")
    for variant, size in paper["hymba_variants_bytes"].items():
        print(f"  hymba-1.5b {variant:40s} {size / MiB:8.1f} MiB")

    torch.set_num_threads(args.threads)  # one thread: shared CPUs make multi-threaded timings erratic
    vocab = 4096
    nemotron = get_family("nemotron_h")
    torch.manual_seed(0)
    models = {
        "hymba": get_family("hymba").model_class(build_config("tiny", {"vocab_size": vocab})),
        "llama": LlamaForCausalLM(tiny_llama_config(vocab)),
        "nemotron_h": nemotron.model_class(nemotron.build_config("tiny", {"vocab_size": vocab})),
    }
    print(f"\nmeasured: {args.context}-token prompt, then {args.rounds} rounds of {args.decode} decode steps "
          f"per model, interleaved; batch 1, fp32, {torch.get_num_threads()} thread(s)")
    state, rows = {}, {}
    for name, net in models.items():
        cache, next_id, prompt_s = read_prompt(net, args.context, args.prefill_chunk if name == "hymba" else None)
        state[name] = [cache, next_id]
        rows[name] = {"model": name, "parameters": sum(p.numel() for p in net.parameters()),
                      "cache_bytes": cache_size(cache), "prompt_s": prompt_s, "seconds_per_token": []}
    for _ in range(args.rounds):  # interleaved, so a burst of load elsewhere hits every model alike
        for name, net in models.items():
            state[name][1], per_token = decode(net, state[name][0], state[name][1], args.decode)
            rows[name]["seconds_per_token"].append(per_token)
    for row in rows.values():
        row["decode_tokens_per_s"] = 1 / statistics.median(row["seconds_per_token"])
        print(f"{row['model']:12s} {format_parameters(row['parameters']):>7s} params  "
              f"cache {row['cache_bytes'] / MiB:8.2f} MiB  decode {row['decode_tokens_per_s']:7.1f} tok/s  "
              f"(prompt read in {row['prompt_s']:.1f} s)")
    hymba = rows["hymba"]
    for other in ("llama", "nemotron_h"):
        r = rows[other]
        print(f"hymba vs {other}: cache {r['cache_bytes'] / hymba['cache_bytes']:.2f}x smaller, "
              f"decode {hymba['decode_tokens_per_s'] / r['decode_tokens_per_s']:.2f}x the tokens/s")
    rows = list(rows.values())

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"analytic": paper, "measured": rows, "args": vars(args)}, indent=1))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
