"""Training throughput: the factory's loop (model/train.py) against a bare
forward/backward/step loop over the same model, batches and data, in one process.

    python bench/train_throughput.py [--preset tiny] [--steps 20] [--repeats 3]

The factory's loop adds the data order, target counting, gradient clipping, the LR
schedule, NaN checks, metric history and the progress bar; the goal is < 5% overhead.
Checkpointing and evaluation are switched off in both (they are I/O, measured apart).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import NemotronHForCausalLM  # noqa: E402

from model.data import PackedTokens  # noqa: E402
from model.pretrain import build_model_config, load_tokenizer, run_prepare_data  # noqa: E402
from model.specs import DataSpec, ModelSpec, TokenizerSpec, TrainSpec  # noqa: E402
from model.train import global_batch, train  # noqa: E402
from registry.store import open_store  # noqa: E402


def bare_loop(net, data: PackedTokens, spec: TrainSpec) -> float:
    """The minimum: the same rows, forward, mean cross entropy, backward, AdamW step."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
    started = time.perf_counter()
    for step in range(spec.steps):
        rows = global_batch(step, spec.batch_size, len(data), spec.seed)
        for start in range(0, spec.batch_size, spec.micro_batch_size):
            input_ids, _ = data.batch(rows[start : start + spec.micro_batch_size])
            logits = net(input_ids=input_ids).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
            (loss / spec.accumulation_steps).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return spec.steps * spec.batch_size * data.seq_len / (time.perf_counter() - started)


def factory_loop(net, data: PackedTokens, spec: TrainSpec) -> float:
    with tempfile.TemporaryDirectory() as work:
        started = time.perf_counter()
        train(net, data, spec, Path(work))
        return spec.steps * spec.batch_size * data.seq_len / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    data_ref = run_prepare_data(DataSpec(), TokenizerSpec(), open_store())
    data = PackedTokens(data_ref.uri, "train")
    config = build_model_config(ModelSpec(preset=args.preset), load_tokenizer(data_ref.tokenizer_uri))
    spec = TrainSpec(steps=args.steps, batch_size=16, micro_batch_size=8, warmup_steps=2,
                     checkpoint_every=10**9, eval_every=10**9)

    results = {"bare": [], "factory": []}
    for repeat in range(args.repeats + 1):  # the first round warms up allocator and kernels
        for name, loop in (("bare", bare_loop), ("factory", factory_loop)):
            torch.manual_seed(0)
            tokens_per_s = loop(NemotronHForCausalLM(config), data, spec)
            if repeat:
                results[name].append(tokens_per_s)
    bare, factory = statistics.median(results["bare"]), statistics.median(results["factory"])
    report = {"preset": args.preset, "steps": args.steps, "batch": "16 x 256 tokens",
              "bare_tokens_per_s": round(bare), "factory_tokens_per_s": round(factory),
              "overhead_percent": round(100 * (bare - factory) / bare, 2), "runs": results}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
