"""The 8B -> 4B recipe's stages rehearsed on a CPU: peak memory and time of each stage.

``recipes/rehearsal-8b-to-4b.yaml`` has the published vocabulary (131,072), context (8,192),
layer pattern, Mamba groups and head dims, with narrow widths. This runs its stages (data,
pretrain, importance, search, prune, distill, evaluate) in this process, through the same
composition the factory uses, and records for each one its wall time and the peak resident
memory of the process while it ran (sampled every 50 ms). Registration is left out (MLflow's).

    python bench/rehearsal.py                  # -> bench/results/rehearsal.json and a table
    FACTORY_ARTIFACT_ROOT=... python bench/rehearsal.py --recipe recipes/rehearsal-8b-to-4b.yaml

The JSON is rewritten after every stage, so a run cut short keeps what it measured. Stored stages
are found, not rerun: a stage measured by an earlier run of this script keeps that run's figures
(marked ``earlier_run``); delete the artifact root to measure every stage again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class PeakMemory:
    """The peak resident memory of this process between start() and stop(), sampled by a thread."""

    def __init__(self, interval_s: float = 0.05):
        import psutil

        self.process, self.interval_s = psutil.Process(), interval_s

    def __enter__(self):
        self.peak, self.running = self.process.memory_info().rss, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "rehearsal-8b-to-4b.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "rehearsal.json")
    args = parser.parse_args()
    os.environ.setdefault("FACTORY_ARTIFACT_ROOT", str(REPO / ".factory" / "rehearsal"))

    from flows.pipeline import DirectRunner, cached_result, compose, context_for
    from flows.recipe import load_recipe
    from store import open_store

    recipe = load_recipe(args.recipe)
    store = open_store()
    stages = []
    earlier = json.loads(args.out.read_text()).get("stages", []) if args.out.is_file() else []
    measured_before = {s["stage"]: s for s in earlier if not s["stored"]}

    def write(extra: dict | None = None):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"recipe": str(args.recipe.relative_to(REPO)), "stages": stages} | (extra or {}),
                                       indent=1))

    class MeasuringRunner(DirectRunner):
        def run(self, stage, spec, inputs):
            stored = cached_result(stage, spec, inputs, self.store) is not None
            started = time.perf_counter()
            with PeakMemory() as memory:
                ref = super().run(stage, spec, inputs)
            record = {"stage": stage.NAME, "stored": stored, "seconds": round(time.perf_counter() - started, 1),
                      "peak_rss_gib": round(memory.peak / 2**30, 2)}
            architecture = getattr(ref, "architecture", None)
            if architecture is not None:
                record["parameters"] = architecture.parameters
            if stored and stage.NAME in measured_before:
                record = measured_before[stage.NAME] | {"earlier_run": True}
            stages.append(record)
            write()
            print(record, file=sys.stderr, flush=True)
            return ref

    refs = compose(recipe, "evaluate", MeasuringRunner(store, context_for(recipe)))
    data = refs["data"]
    from model.data import read_meta
    from model.tokenizer import load_tokenizer

    meta = read_meta(store.fetch(data.uri))
    evaluation = refs["evaluation"]
    result = {"seq_len": meta["seq_len"], "tokenizer_entries": len(load_tokenizer(store.fetch(data.tokenizer_uri))),
              "token_dtype": meta["splits"]["train"]["dtype"],
              "model_vocab_size": refs["teacher"].architecture.config["vocab_size"], "metrics": evaluation.metrics}
    write(result)
    print(f"vocabulary {result['model_vocab_size']} (tokenizer {result['tokenizer_entries']} entries, shards "
          f"{result['token_dtype']}), {result['seq_len']}-token sequences")
    print("| stage | seconds | peak RSS (GiB) | parameters |")
    print("|---|---|---|---|")
    for s in stages:
        seconds = "stored" if s["stored"] else s["seconds"] if not s.get("earlier_run") else f"{s['seconds']} (earlier run)"
        print(f"| {s['stage']} | {seconds} | {s['peak_rss_gib']} | {s.get('parameters', '')} |")


if __name__ == "__main__":
    main()
