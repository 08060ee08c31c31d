"""Pruning ablations at toy scale (Minitron-SSM's group-aware argument, importance vs random).

    python bench/prune_ablation.py [--steps 120] [--out bench/results/prune_ablation.json]

A tiny teacher with 8 Mamba groups of 4 heads (preset tiny-4hpg) is pretrained briefly on
the standard library. Then, zero-shot (no retraining), the validation loss of:
  - Mamba heads cut by 25% and 50%: group-aware vs global (the naive ranking across
    groups, winners packed by position) vs random selection;
  - every other axis at about half its size: activation importance vs random;
and the time of the importance pass (one calibration forward with hooks) relative to a
plain forward over the same calibration rows.
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

from compression.importance import activation_scores, calibration_rows, estimate_importance, random_scores  # noqa: E402
from compression.prune import prune_model  # noqa: E402
from compression.spec import ImportanceSpec, PruneTarget  # noqa: E402
from model import data_stage, pretrain_stage  # noqa: E402
from model.architectures import load_pretrained  # noqa: E402
from model.contract import StageContext  # noqa: E402
from model.data import PackedTokens  # noqa: E402
from model.spec import DataSpec, ModelSpec, TokenizerSpec, TrainSpec  # noqa: E402
from model.train import evaluate_loss  # noqa: E402
from store import open_store  # noqa: E402

RANDOM_SEEDS = range(3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--out", default="bench/results/prune_ablation.json")
    args = parser.parse_args()
    store, context = open_store(), StageContext("bench-4hpg")
    data = data_stage.run(data_stage.DataStageSpec(data=DataSpec(), tokenizer=TokenizerSpec()), {}, store, context)
    teacher_ref = pretrain_stage.run(pretrain_stage.PretrainSpec(
        model=ModelSpec(preset="tiny-4hpg"),
        train=TrainSpec(steps=args.steps, lr=3e-3, warmup_steps=12, checkpoint_every=40, eval_every=10**6)),
        {"data": data}, store, context)
    net, _ = load_pretrained(store.fetch(teacher_ref.uri), dtype=torch.float32)
    net.eval()
    train, validation = PackedTokens(data.uri, "train"), PackedTokens(data.uri, "validation")
    rows = range(min(len(validation), 64))
    spec = ImportanceSpec(samples=64, batch_size=8)
    scores = estimate_importance(net, train, spec)

    def loss(s, target: PruneTarget) -> float:
        return round(evaluate_loss(prune_model(net, s, target), validation, rows, 8), 4)

    def chance(target: PruneTarget) -> list[float]:
        return [loss(random_scores(net.config, seed), target) for seed in RANDOM_SEEDS]

    report = {"teacher": {"parameters": teacher_ref.architecture.parameters,
                          "val_loss": round(evaluate_loss(net, validation, rows, 8), 4),
                          "mamba_heads": net.config.mamba_num_heads, "groups": net.config.n_groups},
              "mamba_heads": {}, "axes": {}}
    for cut, heads in (("25%", 24), ("50%", 16)):
        report["mamba_heads"][cut] = {
            "group_aware": loss(scores, PruneTarget(mamba_num_heads=heads)),
            "global": loss(scores, PruneTarget(mamba_num_heads=heads, mamba_head_selection="global")),
            "random": chance(PruneTarget(mamba_num_heads=heads)),
        }
        print(cut, report["mamba_heads"][cut], flush=True)
    for axis, target in {"hidden_size": PruneTarget(hidden_size=128), "intermediate_size": PruneTarget(intermediate_size=512),
                         "num_attention_heads": PruneTarget(num_attention_heads=2),
                         "mamba_head_dim": PruneTarget(mamba_head_dim=8),
                         "num_layers (KL)": PruneTarget(num_layers=7),
                         "num_layers (cosine)": PruneTarget(num_layers=7, layer_metric="cosine")}.items():
        try:
            report["axes"][axis] = {"importance": loss(scores, target), "random": chance(target)}
        except ValueError as e:  # a depth choice that drops the only attention layer
            report["axes"][axis] = {"error": str(e)}
        print(axis, report["axes"][axis], flush=True)

    # Time: the importance pass vs a plain forward over the same rows (medians of 3).
    calibration = calibration_rows(train, spec.samples, spec.seed)

    @torch.no_grad()
    def plain_forward():
        for start in range(0, len(calibration), spec.batch_size):
            net(input_ids=train.batch(calibration[start : start + spec.batch_size])[0])

    def median_seconds(fn) -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    forward = median_seconds(plain_forward)
    hooked = median_seconds(lambda: activation_scores(net, train, spec))
    report["timing"] = {"forward_s": round(forward, 2), "importance_pass_s": round(hooked, 2),
                        "ratio": round(hooked / forward, 3), "calibration_rows": len(calibration),
                        "torch_threads": torch.get_num_threads()}
    print(report["timing"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
