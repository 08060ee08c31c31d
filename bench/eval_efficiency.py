"""Inference efficiency: a ~100M hybrid teacher, its 50% student, and an attention-only model of equal size.

    python bench/eval_efficiency.py --threads 1  # ~10-15 min of one core; --repeats 3 for steadier numbers
    python bench/eval_efficiency.py --quick      # batch 1 / 4, context 128 / 256: a minute

All three models are transformers' NemotronHForCausalLM with random weights (speed does not
depend on the values), measured in one process with the evaluation code
(model/efficiency.py): prefill and decode tokens/s at each (batch, context), the
cache bytes of the object the model returns, then torch.profiler over decode steps to say
where decode time goes. Prints ratio tables and writes bench/results/eval_efficiency.json.

The student is the teacher's shape at about half the widths (hidden 768 -> 512, FFN 3072 ->
2048, Mamba heads 24 -> 16, attention heads 12 -> 8; KV heads, groups, state size and conv
kernel kept, as Minitron-SSM pruning keeps them), built by config: a pruned checkpoint of
that shape runs the same kernels on the same tensor sizes.

On CPU this measures transformers' PyTorch fallback for Mamba-2 (no mamba-ssm /
causal-conv1d kernels), not the fused kernels GPU users run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.architectures import format_parameters  # noqa: E402
from model.device import DevicePolicy  # noqa: E402
from model.efficiency import (  # noqa: E402
    measure_point,
    prefill_and_decode,
    profile_decode,
    resolve_dtype,
)
from model.nemotron_h import NemotronHForCausalLM, build_config, summarize  # noqa: E402

VOCAB = 16384
# 8 Mamba-2, 8 FFN, 2 attention layers: the 8B pattern's proportions, shortened.
HYBRID_PATTERN = "M-M-M*-M-M-M*-M-M-"
COMMON = dict(vocab_size=VOCAB, num_key_value_heads=4, head_dim=64, mamba_head_dim=64, n_groups=8,
              ssm_state_size=64, conv_kernel=4, chunk_size=128, max_position_embeddings=8192)
MODELS = {
    "teacher (hybrid)": dict(COMMON, pattern=HYBRID_PATTERN, hidden_size=768, intermediate_size=3072,
                             num_attention_heads=12, mamba_num_heads=24),
    "student 50%": dict(COMMON, pattern=HYBRID_PATTERN, hidden_size=512, intermediate_size=2048,
                        num_attention_heads=8, mamba_num_heads=16),
    # 12 attention + 12 FFN layers at the teacher's widths: about the teacher's parameter count.
    "attention-only": dict(COMMON, pattern="*-" * 12, hidden_size=768, intermediate_size=3072,
                           num_attention_heads=12, mamba_num_heads=24),
}


def build(name: str, device, dtype):
    config = build_config("tiny", MODELS[name])
    torch.manual_seed(0)
    return NemotronHForCausalLM(config).to(device=device, dtype=dtype).eval(), summarize(config)


def median_point(runs: list[dict]) -> dict:
    """One point from several runs: the median prefill and decode times."""
    point = dict(runs[0])
    for phase in ("prefill", "decode"):
        seconds = statistics.median(r[f"{phase}_seconds"] for r in runs)
        tokens = point["batch_size"] * (point["context_length"] if phase == "prefill" else point["decode_tokens"])
        point[f"{phase}_seconds"], point[f"{phase}_tokens_per_s"] = seconds, tokens / seconds
    point["runs"] = len(runs)
    return point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--context-lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per point (median)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 on a shared machine, "
                                                   "where OpenMP threads waiting for busy cores distort timings")
    parser.add_argument("--quick", action="store_true", help="batch 1 / 4, context 128 / 256")
    parser.add_argument("--out", default="bench/results/eval_efficiency.json")
    args = parser.parse_args()
    if args.quick:
        args.batch_sizes, args.context_lengths = [1, 4], [128, 256]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = DevicePolicy.from_environment().resolve()
    dtype = resolve_dtype("auto", device)
    print(f"device {device}, {dtype}, {torch.get_num_threads()} threads; "
          f"batches {args.batch_sizes}, contexts {args.context_lengths}, {args.decode_tokens} decode tokens", flush=True)

    started = time.perf_counter()
    nets, results = {}, {}
    for name in MODELS:
        nets[name], summary = build(name, device, dtype)
        # One small untimed run warms the allocator and kernels.
        prefill_and_decode(nets[name], torch.randint(3, VOCAB, (1, 64), device=device), 2)
        results[name] = {"parameters": summary["parameters"], "parameters_by_kind": summary["parameters_by_kind"],
                         "layer_pattern": summary["layer_pattern"], "points": []}
    for batch in args.batch_sizes:
        for length in args.context_lengths:
            # Models take turns within each repeat, so a change in machine load hits all of them alike.
            runs = {name: [] for name in MODELS}
            for _ in range(args.repeats):
                for name, net in nets.items():
                    runs[name].append(measure_point(net, batch, length, args.decode_tokens, warmup=0, repeats=1,
                                                    device=device))
            for name in MODELS:
                point = median_point(runs[name])
                results[name]["points"].append(point)
                print(f"  {name:18s} b{batch:<3d} L{length:<5d} prefill {point['prefill_tokens_per_s']:9.0f} tok/s  "
                      f"decode {point['decode_tokens_per_s']:7.1f} tok/s  "
                      f"cache {point['cache_bytes_per_sequence'] / 2**20:7.2f} MiB/seq", flush=True)
    for name, net in nets.items():
        results[name]["decode_profile"] = profile_decode(net, 1, args.context_lengths[0], args.decode_tokens, device)

    teacher, student, attention = (results[n] for n in MODELS)
    print("\nparameters: " + ", ".join(f"{n} {format_parameters(r['parameters'])} ({r['layer_pattern']})"
                                      for n, r in results.items()))
    print(f"\n{'point':12s} | student/teacher: prefill  decode  cache | attention-only/hybrid: prefill  decode  cache")
    ratios = []
    for t, s, a in zip(teacher["points"], student["points"], attention["points"], strict=True):
        row = {"batch_size": t["batch_size"], "context_length": t["context_length"]}
        for tag, other in (("student_vs_teacher", s), ("attention_vs_hybrid", a)):
            row[tag] = {"prefill": other["prefill_tokens_per_s"] / t["prefill_tokens_per_s"],
                        "decode": other["decode_tokens_per_s"] / t["decode_tokens_per_s"],
                        "cache_bytes": other["cache_bytes_per_sequence"] / t["cache_bytes_per_sequence"]}
        ratios.append(row)
        st, at = row["student_vs_teacher"], row["attention_vs_hybrid"]
        print(f"b{row['batch_size']:<3d} L{row['context_length']:<6d} | {st['prefill']:24.2f}x {st['decode']:6.2f}x "
              f"{st['cache_bytes']:5.2f}x | {at['prefill']:29.2f}x {at['decode']:6.2f}x {at['cache_bytes']:5.2f}x")

    print(f"\nwhere decode time goes (torch.profiler, batch 1, context {args.context_lengths[0]}, "
          f"{args.decode_tokens} steps; module time includes its children):")
    for name, r in results.items():
        p = r["decode_profile"]
        shares = ", ".join(f"{k} {v / p['decode_seconds']:.0%}" for k, v in list(p["by_module_seconds"].items())[:5])
        ops = ", ".join(f"{o['op']} {o['self_seconds'] / p['decode_seconds']:.0%}" for o in p["top_ops"][:4])
        print(f"  {name:18s} {p['decode_seconds'] / args.decode_tokens * 1000:6.1f} ms/token | {shares}\n"
              f"  {'':18s} top ops by self time: {ops}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": str(device), "dtype": str(dtype), "threads": torch.get_num_threads(),
                               "args": vars(args), "models": results, "ratios": ratios,
                               "seconds": time.perf_counter() - started}, indent=1))
    print(f"\n{time.perf_counter() - started:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
