"""The papers' central claim at toy scale: prune + distill needs ~40x fewer tokens than
training the same architecture from scratch (Minitron / Minitron-SSM).

    python bench/minitron_claim.py [--teacher-tokens 1600000] [--out bench/results/minitron.json]

1. Pretrain the tiny teacher (6.3M, 8 Mamba groups) on T tokens of the standard library.
2. Build a ~53% student (hidden 192, FFN 512, 8 Mamba heads = 1 per group) three ways:
   (a) prune by importance + KD on T/40 tokens (and on T/10),
   (b) the same architecture from scratch on T/40 tokens,
   (c) from scratch on T/10, T/4 and T tokens.
3. Token-efficiency multiplier: the scratch tokens needed to reach (a)'s validation loss
   (interpolated in log-tokens along (b)-(c)) divided by (a)'s KD tokens.
Ablations after the same KD on T/40: group-aware vs global Mamba head selection, random vs
activation importance, and width-only vs depth-only students of equal size.

Every run goes through the factory's stage functions (cached in the artifact root), so a
second invocation only recomputes the validation losses. All losses are next-token CE on
the same validation rows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compression import distill_stage, importance_stage, prune_stage  # noqa: E402
from compression.spec import DistillSpec, ImportanceSpec, PruneTarget  # noqa: E402
from model import data_stage, pretrain_stage  # noqa: E402
from model.architectures import format_parameters, load_pretrained  # noqa: E402
from model.contract import StageContext  # noqa: E402
from model.data import PackedTokens  # noqa: E402
from model.spec import DataSpec, ModelSpec, TokenizerSpec, TrainSpec  # noqa: E402
from model.train import evaluate_loss  # noqa: E402
from store import open_store  # noqa: E402

TOKENS_PER_STEP = 16 * 256
WIDTH = {"hidden_size": 192, "intermediate_size": 512, "mamba_num_heads": 8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-tokens", type=int, default=1_600_000)
    parser.add_argument("--kd-lr", type=float, default=3e-3)
    parser.add_argument("--out", default="bench/results/minitron.json")
    args = parser.parse_args()
    store, context = open_store(), StageContext("bench")
    data = data_stage.run(data_stage.DataStageSpec(data=DataSpec(), tokenizer=TokenizerSpec()), {}, store, context)
    validation = PackedTokens(data.uri, "validation")
    rows = range(min(len(validation), 96))
    results, timings = {}, {}

    def val_loss(ref) -> float:
        net, _ = load_pretrained(store.fetch(ref.uri), dtype=torch.float32)
        return evaluate_loss(net, validation, rows, 8)

    def timed(name, fn):
        started = time.perf_counter()
        ref = fn()
        timings[name] = round(time.perf_counter() - started, 1)
        results[name] = {"val_loss": round(val_loss(ref), 4), "parameters": ref.architecture.parameters}
        print(f"{name:32} {format_parameters(ref.architecture.parameters):>7}  val loss {results[name]['val_loss']:.4f}"
              f"  ({timings[name]} s)", flush=True)
        return ref

    def steps(tokens: int) -> int:
        return max(1, round(tokens / TOKENS_PER_STEP))

    T = args.teacher_tokens
    teacher = timed("teacher (T)", lambda: pretrain_stage.run(pretrain_stage.PretrainSpec(
        model=ModelSpec(preset="tiny"),
        train=TrainSpec(steps=steps(T), lr=3e-3, warmup_steps=20, checkpoint_every=100, eval_every=10**6)),
        {"data": data}, store, context))
    scores = importance_stage.run(ImportanceSpec(samples=64), {"teacher": teacher, "data": data}, store, context)

    def scratch(label: str, tokens: int, overrides: dict):
        return timed(label, lambda: pretrain_stage.run(pretrain_stage.PretrainSpec(
            model=ModelSpec(preset="tiny", overrides=overrides),
            train=TrainSpec(steps=steps(tokens), lr=3e-3, warmup_steps=min(20, steps(tokens) // 5),
                            checkpoint_every=100, eval_every=10**6)), {"data": data}, store, context))

    def pruned_and_distilled(label: str, target: PruneTarget, tokens: int, importance=scores):
        student = prune_stage.run(prune_stage.PruneSpec(target=target), {"teacher": teacher, "scores": importance},
                                  store, context)
        results[f"{label} zero-shot"] = {"val_loss": round(val_loss(student), 4),
                                         "parameters": student.architecture.parameters}
        kd_steps = max(1, round(tokens / (8 * 256)))  # batch 8 x 256: more optimizer steps per token
        spec = DistillSpec(train=TrainSpec(steps=kd_steps, batch_size=8, micro_batch_size=8, lr=args.kd_lr,
                                           warmup_steps=max(1, kd_steps // 10), checkpoint_every=100,
                                           eval_every=10**6))
        return timed(label, lambda: distill_stage.run(spec, {"student": student, "teacher": teacher, "data": data},
                                                      store, context))

    width = PruneTarget(**WIDTH)
    pruned_and_distilled("a:prune+KD (T/40)", width, T // 40)
    pruned_and_distilled("a10:prune+KD (T/10)", width, T // 10)
    curve = {}
    for fraction, label in ((40, "b:scratch (T/40)"), (10, "c1:scratch (T/10)"), (4, "c2:scratch (T/4)"), (1, "c3:scratch (T)")):
        scratch(label, T // fraction, WIDTH)
        curve[T // fraction] = results[label]["val_loss"]

    # Token-efficiency multiplier: interpolate log(tokens) at (a)'s loss along the scratch curve.
    target_loss = results["a:prune+KD (T/40)"]["val_loss"]
    points = sorted(curve.items())
    needed = None
    for (t0, l0), (t1, l1) in zip(points, points[1:], strict=False):
        if (l0 - target_loss) * (l1 - target_loss) <= 0 and l0 != l1:
            frac = (l0 - target_loss) / (l0 - l1)
            needed = math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0)))
            break
    multiplier = (needed / (T // 40)) if needed else None
    beyond = needed is None and target_loss < points[-1][1]

    # Ablations, all with the same KD on T/40.
    pruned_and_distilled("global heads+KD (T/40)", PruneTarget(**WIDTH, mamba_head_selection="global"), T // 40)
    random_scores = importance_stage.run(ImportanceSpec(samples=64, method="random"),
                                         {"teacher": teacher, "data": data}, store, context)
    pruned_and_distilled("random importance+KD (T/40)", width, T // 40, random_scores)
    # Depth-only: drop the 4 least important non-attention layers (KL); width-only at the same size.
    from compression.prune import make_plan, pruned_config
    from model.nemotron_h import build_config, parameters_by_kind

    layer_kl = importance_stage.load(store, scores)
    teacher_config = build_config("tiny", {"vocab_size": 4096})
    ranked = [i for i in layer_kl["layer_kl"].argsort().tolist() if teacher_config.layers_block_type[i] != "full_attention"]
    depth = pruned_and_distilled("depth-only+KD (T/40)", PruneTarget(drop_layers=sorted(ranked[:4])), T // 40)

    def size(target: PruneTarget) -> int:
        return sum(parameters_by_kind(pruned_config(teacher_config, make_plan(teacher_config, layer_kl, target))).values())

    same_size = min((PruneTarget(hidden_size=h, intermediate_size=f, mamba_num_heads=8)
                     for h in range(160, 257, 16) for f in (512, 768, 1024)),
                    key=lambda t: abs(size(t) - depth.architecture.parameters))
    pruned_and_distilled("width-only(=depth size)+KD (T/40)", same_size, T // 40)
    depth_params = depth.architecture.parameters

    report = {"teacher_tokens": T, "kd_tokens": T // 40, "results": results, "seconds": timings,
              "scratch_tokens_to_match_a": needed, "token_efficiency_multiplier": multiplier,
              "a_beats_scratch_at_T": beyond, "depth_only_parameters": depth_params,
              "kd_lr": args.kd_lr, "torch_threads": torch.get_num_threads()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=1))
    if multiplier:
        print(f"token-efficiency multiplier: {multiplier:.1f}x (goal: 40x)")
    elif beyond:
        print("prune + KD on T/40 beats scratch training on all T tokens: multiplier > 40x")


if __name__ == "__main__":
    main()
