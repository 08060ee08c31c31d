"""Orchestration overhead: the factory through Prefect (tasks, persisted results, artifacts,
MLflow tracking) against calling the same stage functions directly, in one command.

    python bench/orchestration_overhead.py [--recipe recipes/tiny.yaml] [--order direct,prefect,prefect,direct]

Every run is a fresh process (as ``factory run`` is) with its own empty artifact root,
computing the same stages; the libraries both paths use are imported before its clock starts.
The default order, direct-prefect-prefect-direct, cancels a linear drift of the machine's
speed (this one drifts ~2x over a day). Prefect's ephemeral server start-up is timed apart
(goal: overhead under 5% without it). Each stage call is timed as the flow sees it (a Prefect
task's time includes its result persistence, artifacts and MLflow run), so the report says
where the overhead lies. Last, the final Prefect run is repeated on its root in a new process:
every stage is cached (goal: under 15 s, server start-up apart).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("data", "pretrain", "importance", "search", "prune", "distill", "evaluate", "register")


def timed(runner_class, into: dict):
    """``runner_class`` whose ``run`` adds each stage's wall time to ``into[stage name]``."""

    class Timed(runner_class):
        def run(self, stage, spec, inputs):
            started = time.perf_counter()
            try:
                return super().run(stage, spec, inputs)
            finally:
                into[stage.NAME] = into.get(stage.NAME, 0.0) + time.perf_counter() - started

    return Timed


def run_direct(recipe, root: Path, stage_times: dict) -> None:
    from flows.pipeline import DirectRunner, compose, context_for
    from store.local import LocalStore

    compose(recipe, "register", timed(DirectRunner, stage_times)(LocalStore(root), context_for(recipe)))


def run_prefect(recipe, root: Path, stage_times: dict) -> None:
    import flows.factory

    flows.factory.PrefectRunner = timed(flows.factory.PrefectRunner, stage_times)
    flows.factory.factory(recipe)


def single_run(kind: str, recipe_path: str, root: Path) -> dict:
    """One run in this fresh process: libraries imported first, the server timed apart."""
    os.environ["FACTORY_ARTIFACT_ROOT"] = str(root)
    from flows.local_stack import prefect_environment, start_ephemeral_prefect

    prefect_environment()
    # Both paths import these; neither run should pay for it in its timing.
    import lm_eval  # noqa: F401
    import mlflow  # noqa: F401
    import transformers  # noqa: F401

    import flows.factory  # noqa: F401
    from flows.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    result = {"stages_s": {}}
    if kind == "prefect":
        started = time.perf_counter()
        start_ephemeral_prefect()  # stopped at exit
        result["server_start_s"] = time.perf_counter() - started
    started = time.perf_counter()
    (run_direct if kind == "direct" else run_prefect)(recipe, root, result["stages_s"])
    result["wall_s"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/tiny.yaml")
    parser.add_argument("--order", default="direct,prefect,prefect,direct",
                        help="comma-separated runs, each 'direct' or 'prefect'")
    parser.add_argument("--out", default="bench/results/orchestration.json")
    parser.add_argument("--single", choices=("direct", "prefect"), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:  # a child of the command below
        print(json.dumps(single_run(args.single, args.recipe, Path(args.root))))
        return
    order = args.order.split(",")
    if not set(order) <= {"direct", "prefect"} or not {"direct", "prefect"} <= set(order):
        parser.error("--order needs at least one 'direct' and one 'prefect' run and nothing else")
    base = Path(tempfile.mkdtemp(prefix="factory-bench-"))
    env = dict(os.environ, PREFECT_HOME=str(base / "prefect-home"))
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_RESULTS_LOCAL_STORAGE_PATH"):
        env.pop(key, None)  # each run's own SQLite file and results under its artifact root

    def child(kind: str, root: Path) -> dict:
        out = subprocess.run([sys.executable, __file__, "--recipe", args.recipe, "--single", kind, "--root", str(root)],
                             env=env, stdout=subprocess.PIPE, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    # Each run is its own process (as `factory run` is), so Prefect's ephemeral server lives only
    # during the Prefect runs, and the order direct-prefect-prefect-direct cancels a linear drift.
    runs = {"direct": [], "prefect": []}
    for i, kind in enumerate(order):
        root = base / f"{i}-{kind}"
        runs[kind].append(child(kind, root))
        print(f"run {i + 1}/{len(order)} ({kind}): {runs[kind][-1]['wall_s']:.1f} s", flush=True)
    last_prefect = base / f"{max(i for i, kind in enumerate(order) if kind == 'prefect')}-prefect"
    cached = child("prefect", last_prefect)

    mean = {kind: statistics.mean(r["wall_s"] for r in rs) for kind, rs in runs.items()}
    stage_mean = {kind: {stage: statistics.mean(r["stages_s"].get(stage, 0.0) for r in rs) for stage in STAGES}
                  for kind, rs in runs.items()}
    report = {
        "recipe": args.recipe, "order": order,
        "direct_s": [round(r["wall_s"], 1) for r in runs["direct"]],
        "prefect_s": [round(r["wall_s"], 1) for r in runs["prefect"]],
        "overhead_percent": round(100 * (mean["prefect"] - mean["direct"]) / mean["direct"], 2),
        "server_start_s": [round(r["server_start_s"], 2) for r in runs["prefect"] + [cached]],
        "cached_rerun_s": round(cached["wall_s"], 2),
        "stages_mean_s": {stage: {"direct": round(stage_mean["direct"][stage], 2),
                                  "prefect": round(stage_mean["prefect"][stage], 2),
                                  "difference": round(stage_mean["prefect"][stage] - stage_mean["direct"][stage], 2)}
                          for stage in STAGES},
        "outside_stages_mean_s": {kind: round(mean[kind] - sum(stage_mean[kind].values()), 2) for kind in mean},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
