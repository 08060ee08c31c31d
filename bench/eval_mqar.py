"""Train tiny models on MQAR (multi-query associative recall) and compare architectures.

    python bench/eval_mqar.py recipes/mqar/tiny.yaml
    python bench/eval_mqar.py recipes/mqar/tiny.yaml --steps 200 --models attention hybrid   # shorter

Every model of the recipe trains on the same generated data with the factory's training loop
(evaluation/recall.py ``train_mqar``), then is scored on the recipe's grid of
(sequence length, key-value pairs). Prints accuracy by grid point, writes
bench/results/<name>/mqar.json and recall.png. Runs resume from their checkpoints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.recall import train_mqar  # noqa: E402
from evaluation.report import plot_recall, save_figure  # noqa: E402
from evaluation.spec import MQARRecipe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--steps", type=int, help="override train.steps")
    parser.add_argument("--models", nargs="+", help="only these models of the recipe")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    values = yaml.safe_load(Path(args.recipe).read_text())
    if args.steps:
        values["train"]["steps"] = args.steps
    if args.models:
        values["models"] = {name: values["models"][name] for name in args.models}
    recipe = MQARRecipe.model_validate(values)
    out = Path(args.out) / recipe.name
    started = time.perf_counter()
    results = train_mqar(recipe, out / "work")

    lengths, pairs = recipe.eval_seq_lens, recipe.eval_kv_pairs
    print(f"\nMQAR accuracy (vocab {recipe.task.vocab_size}, chance {2 / recipe.task.vocab_size:.3f}; "
          f"trained at L={recipe.task.seq_len}, {recipe.task.num_kv_pairs} pairs, {recipe.train.steps} steps)")
    print(f"{'model':10s} {'params':>7s} {'loss':>6s} " + " ".join(f"L{n}/kv{kv}".rjust(10) for n in lengths for kv in pairs))
    for name, r in results.items():
        grid = {(row["seq_len"], row["num_kv_pairs"]): row["accuracy"] for row in r["mqar"]}
        cells = " ".join(f"{grid[(n, kv)]:10.3f}" if (n, kv) in grid else f"{'-':>10s}" for n in lengths for kv in pairs)
        print(f"{name:10s} {r['parameters']:7d} {r['final_loss']:6.3f} {cells}")
    save_figure(plot_recall({name: {"recall": {"mqar": r["mqar"]}} for name, r in results.items()}), out / "recall.png")
    (out / "mqar.json").write_text(json.dumps({"recipe": recipe.model_dump(mode="json"), "results": results}, indent=1))
    print(f"\n{time.perf_counter() - started:.0f} s; {out / 'mqar.json'}, {out / 'recall.png'}")


if __name__ == "__main__":
    main()
