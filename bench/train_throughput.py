"""Training throughput: the factory's loop (model/train.py) against a bare
forward/backward/step loop over the same model, batches and data, in one process.

    python bench/train_throughput.py [--preset tiny] [--steps 20] [--repeats 3] [--tracking]

The factory's loop adds the data order, target counting, gradient clipping, the LR
schedule, NaN checks, metric history and the progress bar; the goal is < 5% overhead.
Checkpointing and evaluation are switched off in both (they are I/O, measured apart).

``--tracking`` splits what a training stage pays under ``factory run`` on top of the loop:
``mlflow`` (a stage run on SQLite with system metrics, every step's metrics logged as the
flow logs them) and, once Prefect's ephemeral server is started (as ``factory run`` starts
it), ``progress`` (the Prefect progress artifact updated as the flow updates it) and
``in_prefect_task`` (the loop run inside a task of a flow run) against ``factory+server`` (the
same loop beside the idle server). Variants run interleaved in every
round of their phase.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import NemotronHForCausalLM  # noqa: E402

from model import data_stage  # noqa: E402
from model.architectures import build_model_config  # noqa: E402
from model.contract import StageContext  # noqa: E402
from model.data import PackedTokens  # noqa: E402
from model.spec import DataSpec, ModelSpec, TokenizerSpec, TrainSpec  # noqa: E402
from model.tokenizer import load_tokenizer  # noqa: E402
from model.train import global_batch, train  # noqa: E402
from store import open_store  # noqa: E402


def training_setup(preset: str, steps: int) -> tuple[PackedTokens, object, TrainSpec]:
    """The built-in corpus, a model config of ``preset`` and a 16 x 256-token step, with
    checkpointing and evaluation off: what every throughput measurement here trains."""
    data_ref = data_stage.run(data_stage.DataStageSpec(data=DataSpec(), tokenizer=TokenizerSpec()), {}, open_store(),
                              StageContext("bench"))
    config = build_model_config(ModelSpec(preset=preset), load_tokenizer(data_ref.tokenizer_uri))
    spec = TrainSpec(steps=steps, batch_size=16, micro_batch_size=8, warmup_steps=2,
                     checkpoint_every=10**9, eval_every=10**9)
    return PackedTokens(data_ref.uri, "train"), config, spec


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


def tracked_loop(callbacks):
    """The factory loop with the step callbacks a ``callbacks()`` context manager yields."""

    def loop(net, data: PackedTokens, spec: TrainSpec) -> float:
        with callbacks(spec) as on_step, tempfile.TemporaryDirectory() as work:
            started = time.perf_counter()
            train(net, data, spec, Path(work), callbacks=(on_step,))
            return spec.steps * spec.batch_size * data.seq_len / (time.perf_counter() - started)

    return loop


@contextmanager
def mlflow_metrics(spec: TrainSpec):
    """As tasks/stages.py does: a nested stage run (system metrics on), per-step metrics."""
    from registry import tracking

    parent = tracking.start_factory_run({"name": "bench"}, experiment="bench")
    with tracking.stage_run(parent, "pretrain") as run_id:
        yield tracking.metrics_callback(run_id)
    tracking.finish_run(parent)


@contextmanager
def prefect_progress(spec: TrainSpec):
    from tasks.ui import stage_progress

    with stage_progress("bench", "pretrain") as progress:
        yield lambda record: progress(record["step"] / spec.steps)


def in_prefect_task(net, data: PackedTokens, spec: TrainSpec) -> float:
    """The factory loop inside a Prefect task inside a flow run (no callbacks): what the
    orchestrator itself costs a training stage (its threads, logs and state reports)."""
    from prefect import flow, task

    @task(name="bench-train")
    def train_task() -> float:
        return factory_loop(net, data, spec)

    @flow(name="bench-train")
    def train_flow() -> float:
        return train_task()

    return train_flow()


@contextmanager
def no_callback(spec: TrainSpec):
    yield lambda record: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tracking", action="store_true", help="also split MLflow, Prefect server and progress costs")
    parser.add_argument("--out", default="bench/results/train_throughput.json")
    args = parser.parse_args()
    if args.tracking:
        work = Path(tempfile.mkdtemp(prefix="factory-bench-tracking-"))
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        os.environ["PREFECT_HOME"] = str(work / "prefect")
        os.environ.pop("PREFECT_API_URL", None)

    data, config, spec = training_setup(args.preset, args.steps)

    phases = [{"bare": bare_loop, "factory": factory_loop}]
    if args.tracking:
        phases[0]["mlflow"] = tracked_loop(mlflow_metrics)
        # The server's presence cannot be switched off per variant: a second phase with it running.
        phases.append({"factory+server": tracked_loop(no_callback), "progress": tracked_loop(prefect_progress),
                       "in_prefect_task": in_prefect_task})
    results = {}
    for phase in phases:
        if "progress" in phase:
            from flows.local_stack import prefect_environment, start_ephemeral_prefect

            prefect_environment()
            start_ephemeral_prefect()  # stopped at exit
        for repeat in range(args.repeats + 1):  # the first round warms up allocator and kernels
            for name, loop in phase.items():
                torch.manual_seed(0)
                tokens_per_s = loop(NemotronHForCausalLM(config), data, spec)
                if repeat:
                    results.setdefault(name, []).append(tokens_per_s)
    median = {name: statistics.median(runs) for name, runs in results.items()}
    bare, factory = median["bare"], median["factory"]
    report = {"preset": args.preset, "steps": args.steps, "batch": "16 x 256 tokens",
              "bare_tokens_per_s": round(bare), "factory_tokens_per_s": round(factory),
              "overhead_percent": round(100 * (bare - factory) / bare, 2)}
    if args.tracking:
        # Each against its baseline in its own phase. The idle server's own cost is not reported: the
        # phases run one after the other, and this machine drifts more than it (< 1% interleaved).
        report["tokens_per_s"] = {name: round(v) for name, v in median.items()}
        report["mlflow_cost_percent"] = round(100 * (factory - median["mlflow"]) / factory, 2)
        report["prefect_task_cost_percent"] = round(
            100 * (median["factory+server"] - median["in_prefect_task"]) / median["factory+server"], 2)
        report["progress_artifact_cost_percent"] = round(
            100 * (median["factory+server"] - median["progress"]) / median["factory+server"], 2)
    report["runs"] = {name: [round(v) for v in runs] for name, runs in results.items()}
    print(json.dumps(report, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
