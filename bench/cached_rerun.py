"""A fully cached ``factory run``: this checkout against an earlier commit, in one command.

    python bench/cached_rerun.py [--recipe recipes/tiny.yaml] [--baseline 93e8881] [--rounds 3]
                                 [--keep DIR]

The baseline (default: the last commit before ``factory run`` planned first and skipped the
Prefect server when every stage is stored) is checked out in a git worktree and run with this
checkout's virtual environment, its modules first on the path. Each version first runs the
recipe once on its own empty artifact root and Prefect home (minutes: every stage computes;
``--keep DIR`` keeps the roots so a second invocation skips this), then the cached re-runs are
timed, each a fresh process as a user's would be, in alternating order (baseline, current,
current, baseline, ...) so that a drift of the machine's speed touches both alike. Both must
print the same table and the same registered version. ``factory run --plan`` is timed too.
Results: bench/results/cached_rerun.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = "93e8881"  # main before issue 15: a cached re-run started the ephemeral server and ran the flow


def environment(code: Path, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "FACTORY_"))}
    return env | {"FACTORY_ARTIFACT_ROOT": str(home / "root"), "FACTORY_WORK_DIR": str(home / "work"),
                  "PREFECT_HOME": str(home / "prefect"), "PYTHONPATH": str(code)}


def factory(code: Path, home: Path, *args: str, timeout: float = 3600) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=code, env=environment(code, home),
                            capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"factory {' '.join(args)} in {code} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return elapsed, result


def table(output: str) -> list[str]:
    """What both versions must agree on: parameters and validation loss of teacher and student,
    the gate and the registered version (decode speed is measured, so it differs run to run)."""
    lines = output.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if "parameters" in line and "val loss" in line)
    rows = [" ".join(lines[i].split()[:3]) for i in (start + 1, start + 2)]
    return rows + [lines[start + 3], lines[-1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/tiny.yaml")
    parser.add_argument("--baseline", default=BASELINE, help="the commit to compare with (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="timed re-runs of each version (default %(default)s)")
    parser.add_argument("--keep", help="a folder for the populated roots, kept for later invocations")
    parser.add_argument("--out", default="bench/results/cached_rerun.json")
    args = parser.parse_args()
    recipe = str((REPO / args.recipe).resolve())
    work = Path(args.keep or tempfile.mkdtemp(prefix="cached-rerun-")).resolve()
    baseline_code = work / "baseline-code"
    if not baseline_code.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(baseline_code), args.baseline],
                       check=True, capture_output=True)
    versions = {"baseline": (baseline_code, work / "baseline"), "current": (REPO, work / "current")}
    try:
        populate_s = {}
        for name, (code, home) in versions.items():
            if not (home / "root" / "refs").is_dir():
                print(f"{name}: first run of {args.recipe} (every stage computes) ...", flush=True)
                populate_s[name] = round(factory(code, home, "run", recipe)[0], 1)

        times, tables = {name: [] for name in versions}, {}
        order = (["baseline", "current", "current", "baseline"] * args.rounds)[: 2 * args.rounds]
        for name in order:
            code, home = versions[name]
            elapsed, result = factory(code, home, "run", recipe)
            times[name].append(round(elapsed, 2))
            tables.setdefault(name, table(result.stdout))
            if name == "current" and "every stage is stored" not in result.stderr:
                raise RuntimeError(f"the current version did not find every stage stored:\n{result.stderr[-3000:]}")
            print(f"{name:8} cached re-run {elapsed:6.2f} s", flush=True)
        if tables["baseline"] != tables["current"]:
            raise RuntimeError(f"the two versions disagree:\n{tables}")
        plan_s, plan = factory(REPO, versions["current"][1], "run", "--plan", recipe)
        report = {
            "recipe": args.recipe, "baseline": args.baseline,
            "current": subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                                      capture_output=True, text=True).stdout.strip(),
            "first_run_s": populate_s, "cached_rerun_s": times,
            "median_s": {name: statistics.median(ts) for name, ts in times.items()},
            "speedup": round(statistics.median(times["baseline"]) / statistics.median(times["current"]), 2),
            "plan_s": round(plan_s, 2), "plan": plan.stdout.strip().splitlines()[-10:],
            "output": tables["current"],
        }
        print(json.dumps(report, indent=1))
        out = REPO / args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
    finally:
        if not args.keep:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline_code)],
                           capture_output=True)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
