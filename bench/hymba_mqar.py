"""Associative recall (MQAR) after the same training budget: Hymba against an attention-only
(Llama-style) model and Nemotron-H at equal parameters, in one process.

    python bench/hymba_mqar.py [--steps 250] [--seq-len 64] [--kv-pairs 4] [--vocab 128]

The Hymba paper reports recall-intensive accuracy of 49.90 for Hymba-1.5B against 19.23 for
Llama-3.2-3B (docs/architectures.md 2.5); Zoology (arXiv 2312.04927) shows SSMs need more width than
attention to recall. This is a CPU-sized version: the `micro` Hymba (6 layers, width 64,
window 8 so most pairs lie outside the window layers' reach; ~0.29M parameters) against a
6-layer Llama and a 9-layer Nemotron-H (pattern M-M*-M-M-) of the same width, each with its
FFN width chosen to match Hymba's parameter count. All three train with the factory's loop
(model/train.py) on the same MQAR examples (evaluation/recall.py), the same steps, batch,
learning rate and seed; accuracy is measured on held-out examples at the training length.

Results go to bench/results/hymba_mqar.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.recall import make_mqar, mqar_loss, predict_next, recall_accuracy, write_mqar_rows  # noqa: E402
from model.architectures import format_parameters, get_family  # noqa: E402
from model.data import PackedTokens  # noqa: E402
from model.spec import TrainSpec  # noqa: E402
from model.train import train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "hymba_mqar.json"


def parameter_count(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def matched_ffn(build_with_ffn, target: int) -> int:
    """The FFN width (a multiple of 16) that brings a model closest to ``target`` parameters."""
    return min(range(16, 2049, 16), key=lambda width: abs(parameter_count(lambda: build_with_ffn(width)) - target))


def model_builders(vocab: int) -> dict:
    hymba = get_family("hymba")
    nemotron = get_family("nemotron_h")
    build_hymba = lambda: hymba.model_class(hymba.build_config("micro", {"vocab_size": vocab}))
    target = parameter_count(build_hymba)
    llama = lambda width: LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=width, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, use_cache=False))
    nemotron_h = lambda width: nemotron.model_class(nemotron.build_config(
        "micro", {"vocab_size": vocab, "pattern": "M-M*-M-M-", "intermediate_size": width, "use_cache": False}))
    llama_width, nemotron_width = matched_ffn(llama, target), matched_ffn(nemotron_h, target)
    return {"hymba": build_hymba, "llama": lambda: llama(llama_width), "nemotron_h": lambda: nemotron_h(nemotron_width)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--kv-pairs", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--train-examples", type=int, default=20000)
    parser.add_argument("--test-examples", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_set = make_mqar(args.train_examples, args.seq_len, args.kv_pairs, args.vocab, seed=0)
    test_set = make_mqar(args.test_examples, args.seq_len, args.kv_pairs, args.vocab, seed=1)
    spec = TrainSpec(steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.batch_size, lr=args.lr,
                     warmup_steps=20, schedule="cosine", checkpoint_every=10**9, eval_every=10**9, device="cpu",
                     seed=0)
    print(f"MQAR seq_len {args.seq_len}, {args.kv_pairs} pairs, vocab {args.vocab} (chance {test_set.chance:.3f}); "
          f"{args.steps} steps x {args.batch_size} examples, lr {args.lr:g}, {torch.get_num_threads()} thread(s)")

    rows = []
    with tempfile.TemporaryDirectory() as work:
        data = PackedTokens(write_mqar_rows(train_set, Path(work) / "data"), "train")
        for name, build in model_builders(args.vocab).items():
            torch.manual_seed(0)
            net = build()
            started = time.perf_counter()
            result = train(net, data, spec, Path(work) / name, loss_fn=mqar_loss, description=f"MQAR {name}")
            seconds = time.perf_counter() - started
            accuracy = recall_accuracy(predict_next(net, test_set.input_ids, batch_size=64), test_set.labels)
            row = {"model": name, "parameters": sum(p.numel() for p in net.parameters()), "accuracy": accuracy,
                   "final_loss": result["final_loss"], "train_seconds": seconds,
                   "ffn_width": net.config.intermediate_size}
            rows.append(row)
            print(f"{name:12s} {format_parameters(row['parameters']):>7s} params (FFN {row['ffn_width']})  "
                  f"recall {accuracy:.3f}  final loss {row['final_loss']:.3f}  ({seconds:.0f} s)", flush=True)

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows, "chance": test_set.chance, "args": vars(args)}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
