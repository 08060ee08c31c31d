"""CPU an idle ephemeral Prefect server takes, with Prefect's defaults and with the settings
`factory run` applies (automation triggers off), in one command.

    python bench/ephemeral_server_idle.py [--seconds 60]

On a 2-core machine the server runs beside the training process for the whole flow, so its
idle CPU is a floor under the orchestration overhead (bench/orchestration_overhead.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def idle_share(seconds: float) -> float:
    """Fraction of one core the server process used while nothing talked to it."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=600)
    try:
        process = psutil.Process(server.server_process.pid)
        time.sleep(10)  # past start-up work
        before, started = process.cpu_times(), time.perf_counter()
        time.sleep(seconds)
        after = process.cpu_times()
        return ((after.user + after.system) - (before.user + before.system)) / (time.perf_counter() - started)
    finally:
        server.stop()


def measure_in_fresh_process(seconds: float, triggers: bool) -> float:
    """Prefect reads its settings once per process: each configuration gets its own."""
    env = dict(os.environ, PREFECT_HOME=tempfile.mkdtemp(prefix="factory-bench-prefect-"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED=str(triggers).lower())
    result = subprocess.run([sys.executable, __file__, "--seconds", str(seconds), "--measure"], env=env,
                            capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--out", default="bench/results/ephemeral_server_idle.json")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one configuration, here
    args = parser.parse_args()
    if args.measure:
        print(idle_share(args.seconds))
        return
    prefect_defaults = measure_in_fresh_process(args.seconds, triggers=True)
    triggers_off = measure_in_fresh_process(args.seconds, triggers=False)
    report = {"seconds": args.seconds, "prefect_defaults_core_share": round(prefect_defaults, 4),
              "triggers_off_core_share": round(triggers_off, 4),
              "ratio": round(prefect_defaults / triggers_off, 2) if triggers_off else None}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
