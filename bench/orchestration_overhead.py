"""Orchestration overhead: the factory through Prefect (tasks, persisted results, artifacts,
MLflow tracking) against calling the same stage functions directly, in one command.

    python bench/orchestration_overhead.py [--recipe recipes/tiny.yaml]

Both runs start from empty artifact roots and compute the same stages; Prefect's ephemeral
server start-up is timed apart (goal: overhead under 5% without it). Then the Prefect run
is repeated on its root: every stage is cached (goal: under 15 s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/tiny.yaml")
    parser.add_argument("--out", default="bench/results/orchestration.json")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="factory-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{base / 'mlflow.db'}"
    os.environ["PREFECT_HOME"] = str(base / "prefect-home")
    from flows.cli import prefect_environment
    from flows.recipe import load_recipe
    from registry.store import LocalStore

    recipe = load_recipe(args.recipe)
    timings = {}

    # 1. Direct: the stage functions in order, no orchestrator, no tracking.
    from flows.pipeline import DirectStages, compose

    os.environ["FACTORY_ARTIFACT_ROOT"] = str(base / "direct")
    started = time.perf_counter()
    compose(recipe, "register", DirectStages(LocalStore(base / "direct")))
    timings["direct_s"] = time.perf_counter() - started

    # 2. Prefect: start the ephemeral server first (timed apart), then the flow.
    os.environ["FACTORY_ARTIFACT_ROOT"] = str(base / "prefect")
    os.environ.pop("PREFECT_RESULTS_LOCAL_STORAGE_PATH", None)
    prefect_environment()
    from prefect.server.api.server import SubprocessASGIServer

    started = time.perf_counter()
    server = SubprocessASGIServer()
    server.start(timeout=600)
    os.environ["PREFECT_API_URL"] = server.api_url
    timings["server_start_s"] = time.perf_counter() - started
    try:
        from flows.factory import factory

        started = time.perf_counter()
        factory(recipe)
        timings["prefect_s"] = time.perf_counter() - started
        started = time.perf_counter()
        factory(recipe)
        timings["cached_rerun_s"] = time.perf_counter() - started
    finally:
        server.stop()
    timings["overhead_percent"] = 100 * (timings["prefect_s"] - timings["direct_s"]) / timings["direct_s"]
    report = {"recipe": args.recipe, **{k: round(v, 2) for k, v in timings.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
