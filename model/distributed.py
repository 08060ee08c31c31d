"""torch.distributed plumbing for the training loop: nothing home-made, just the env contract
``torchrun`` sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from model.device import DevicePolicy


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(requested_device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    device = DevicePolicy().resolve(requested_device, "train.device")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shard(model: torch.nn.Module) -> None:
    """FSDP2 in place: each decoder block (the classes transformers lists in ``_no_split_modules``)
    is one unit of all-gather/reduce-scatter, the root holds what is left (embeddings, final
    norm, lm_head). Build the optimizer afterwards: it must see the sharded parameters."""
    from torch.distributed.fsdp import fully_shard

    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_classes]
    if not blocks:
        raise ValueError(f"train.parallelism 'fsdp': {type(model).__name__} names no decoder block class "
                         "in _no_split_modules to shard by")
    for block in blocks:
        fully_shard(block)
    fully_shard(model)


def all_reduce_sum(values: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


STEPS_FILE = "steps.jsonl"  # in a launch's work folder: rank 0's step records, for the launching process


def step_recorder(launch: dict) -> tuple[Callable[[dict], None], ...]:
    """In a torchrun worker: a training callback that appends each step's record (rank 0 reports)
    to the launch's steps file, from which the launching process forwards it to its own callbacks
    (MLflow's live curves, the Prefect progress artifact). Empty outside a launch."""
    path = launch.get("steps_file")
    if not path:
        return ()

    def append(record: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    return (append,)


def _forward_steps(path: Path, offset: int, callbacks: Sequence[Callable[[dict], None]]) -> int:
    """Call ``callbacks`` with each whole record appended to ``path`` after byte ``offset``; the new offset."""
    if not path.is_file():
        return offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    whole = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next call
    for line in whole.splitlines():
        for callback in callbacks:
            callback(json.loads(line))
    return offset + len(whole)


def launch_workers(module: str, launch: dict, num_processes: int, work_dir: Path,
                   callbacks: Sequence[Callable[[dict], None]] = ()) -> None:
    """Run ``python -m module LAUNCH_FILE`` in ``num_processes`` processes with torchrun, and wait,
    forwarding rank 0's step records to ``callbacks`` as they come (every second).

    ``launch`` (JSON) tells each worker what to train; ``--standalone`` picks a free port."""
    from model.fsutil import atomic_write_text

    work_dir = Path(work_dir)
    steps_file = work_dir / STEPS_FILE
    offset = steps_file.stat().st_size if steps_file.is_file() else 0  # records of an earlier attempt: sent then
    launch_file = work_dir / "launch.json"
    atomic_write_text(launch_file, json.dumps({**launch, "steps_file": str(steps_file)}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={num_processes}", "-m", module, str(launch_file)]
    print("launching:", " ".join(command), file=sys.stderr)
    process = subprocess.Popen(command)
    try:
        while True:
            try:
                process.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                offset = _forward_steps(steps_file, offset, callbacks)
    finally:
        if process.poll() is None:  # the launcher itself was interrupted: take the workers down too
            process.terminate()
            process.wait()
    _forward_steps(steps_file, offset, callbacks)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)


def run_training(module: str, launch: dict, num_processes: int, work_dir: Path,
                 here: Callable[[dict, tuple], None], callbacks: Sequence[Callable[[dict], None]] = ()) -> None:
    """Run what a launch record describes: ``here(launch, callbacks)`` in this process, or, with more
    than one process and not already under torchrun, ``python -m module LAUNCH`` in ``num_processes``
    torchrun workers (each runs the module's ``__main__``), whose rank 0 step records reach
    ``callbacks`` all the same; and wait."""
    if num_processes > 1 and not under_torchrun():
        launch_workers(module, launch, num_processes, work_dir, callbacks)
    else:
        here(launch, tuple(callbacks))
