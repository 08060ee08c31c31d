"""Training checkpoints: everything needed to resume, written so a crash never leaves a
checkpoint that looks complete but is not.

One folder per save, ``step_00000100/``, holding

    model.safetensors    the weights
    optimizer.pt         optimizer and LR-scheduler state (tensors and numbers only;
                         read back with ``torch.load(weights_only=True)``)
    rng.pt               torch CPU (and CUDA) RNG states
    trainer_state.json   step, data position, tokens seen, metric history
    COMPLETE             written last: every file's size and sha256

The files go into ``.step_00000100.tmp/`` first, the folder is renamed, and the marker is
written last. ``find_latest`` walks back from the newest folder and skips, with a warning,
any whose marker is missing or whose files do not match it (a truncated or corrupt save).
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from model.digests import file_digest
from model.fsutil import atomic_write_text, fsync_dir

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "trainer_state.json"
MARKER_FILE = "COMPLETE"
_PREFIX = "step_"


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict  # trainer_state.json


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer, scheduler, state: dict,
                    keep: int, full_states: tuple[dict, dict] | None = None) -> Path:
    """``full_states``: (weights, optimizer state) already gathered from a sharded (FSDP) model,
    in place of ``model`` and ``optimizer``'s own state dicts."""
    root = Path(root)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    if full_states is None:
        save_model(model, str(tmp / MODEL_FILE))
        optimizer_state = optimizer.state_dict()
    else:
        weights, optimizer_state = full_states
        save_file(weights, str(tmp / MODEL_FILE))
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, tmp / OPTIMIZER_FILE)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / RNG_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    fsync_dir(tmp)

    shutil.rmtree(final, ignore_errors=True)  # a stale, unmarked folder from an earlier crash
    tmp.rename(final)
    files = {f.name: {"size": f.stat().st_size, "sha256": file_digest(f)} for f in sorted(final.iterdir())}
    atomic_write_text(final / MARKER_FILE, json.dumps(files, indent=1))

    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders, oldest first (including incomplete ones)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))


def checkpoint_problem(path: Path) -> str | None:
    """Why this checkpoint cannot be resumed from, or None when it is whole."""
    marker = path / MARKER_FILE
    if not marker.is_file():
        return "no COMPLETE marker (the save was interrupted)"
    try:
        files = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return "unreadable COMPLETE marker"
    for name in (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE):
        if name not in files:
            return f"{name} missing from the marker"
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != info["size"]:
            return f"{name} is {f.stat().st_size} bytes, expected {info['size']} (truncated)"
        if file_digest(f) != info["sha256"]:
            return f"{name} does not match its sha256 (corrupt)"
    return None


def find_latest(root: Path) -> Checkpoint | None:
    """The newest whole checkpoint under ``root``; broken newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        problem = checkpoint_problem(path)
        if problem:
            warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=2)
            continue
        state = json.loads((path / STATE_FILE).read_text())
        return Checkpoint(path, state["step"], state)
    return None


def load_checkpoint(checkpoint: Checkpoint, model: torch.nn.Module, optimizer, scheduler,
                    sharded: bool = False) -> None:
    """Restore weights, optimizer, scheduler and RNG state in place. ``sharded``: ``model`` is
    FSDP-sharded and the checkpoint holds full states (every process reads them, keeps its shard)."""
    states = torch.load(checkpoint.path / OPTIMIZER_FILE, weights_only=True)
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=load_file(str(checkpoint.path / MODEL_FILE)),
                       optim_state_dict=states["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        load_model(model, str(checkpoint.path / MODEL_FILE))
        optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    rng = torch.load(checkpoint.path / RNG_FILE, weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
