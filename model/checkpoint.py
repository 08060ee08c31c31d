"""Training checkpoints: everything needed to resume, written so a crash never leaves a
checkpoint that looks complete but is not.

One folder per save, ``step_00000100/``, holding

    model.safetensors    the weights                                     } one process or DDP:
    optimizer.pt         optimizer and LR-scheduler state                } whole states, rank 0 writes
  or
    sharded/             FSDP: weights and optimizer moments, one safetensors file per process,
                         each tensor's offset in its header (torch.distributed.checkpoint's
                         Hugging Face format); no process gathers the whole model
    optimizer.pt         the optimizer's hyperparameters (param_groups) and the LR scheduler
  and
    rng.pt               torch CPU (and CUDA) RNG states
    trainer_state.json   step, data position, tokens seen, metric history
    COMPLETE             written last: every file's size and sha256
  or, for a loop run by transformers' ``Trainer`` (the align stages, through TRL):
    hf_trainer/          the ``checkpoint-N`` folder the Trainer saved, as it saved it
    trainer_state.json   {"step": N, "format": "hf_trainer"}
    COMPLETE             as above

``optimizer.pt`` and ``rng.pt`` hold tensors, numbers and strings only and are read back with
``torch.load(weights_only=True)``; nothing in a checkpoint is unpickled. A sharded checkpoint
loads into any number of processes (``torch.distributed.checkpoint`` reads each process's
slices from the files that hold them), and into one process without a process group; a whole
one loads into FSDP too (every process reads it and keeps its shard).

The files go into ``.step_00000100.tmp/`` first, the folder is renamed, and the marker is
written last. In a sharded save every process hashes its share of the files (an 8B checkpoint
with its optimizer state is ~100 GB: hashed by one process, that is minutes with every GPU
idle); the folder must be one every process sees (one node's disk, or a shared file system).
``find_latest`` walks back from the newest folder and skips, with a warning, any whose marker
is missing or whose files do not match it (a truncated or corrupt save).

``save_checkpoint`` and ``load_checkpoint`` are collectives when the training is distributed:
every process calls them.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, load_model, save_model

from model.digests import file_digest
from model.fsutil import atomic_write_text, fsync_dir

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SHARDED_DIR = "sharded"
RNG_FILE = "rng.pt"
STATE_FILE = "trainer_state.json"
MARKER_FILE = "COMPLETE"
TRAINER_DIR = "hf_trainer"
_PREFIX = "step_"
_MODEL_KEY, _OPTIMIZER_KEY = "model.", "optimizer."  # prefixes of the sharded files' tensor names


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict  # trainer_state.json

    @property
    def sharded(self) -> bool:
        return (self.path / SHARDED_DIR).is_dir()

    @property
    def trainer_folder(self) -> Path | None:
        """The Trainer's own checkpoint folder (``resume_from_checkpoint``), for a sealed Trainer save."""
        return self.path / TRAINER_DIR if (self.path / TRAINER_DIR).is_dir() else None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def step_folder(root: Path, step: int) -> Path:
    return Path(root) / f"{_PREFIX}{step:08d}"


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer, scheduler, state: dict,
                    keep: int, sharded: bool = False) -> Path:
    """Write step ``step``'s checkpoint under ``root`` and keep the newest ``keep``. Every process
    calls it; ``sharded``: ``model`` is FSDP-sharded and each process writes its own shard."""
    final = step_folder(root, step)
    tmp = final.with_name(f".{final.name}.tmp")
    main = _rank() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()

    if sharded:
        _save_sharded(tmp, model, optimizer, scheduler)
    elif main:
        save_model(model, str(tmp / MODEL_FILE))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIMIZER_FILE)
    if main:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / RNG_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    _barrier()

    files = _hash_files(tmp, shared=sharded)
    if main:
        for folder in {tmp, *(p.parent for p in tmp.rglob("*") if p.is_file())}:
            fsync_dir(folder)
        shutil.rmtree(final, ignore_errors=True)  # a stale, unmarked folder from an earlier crash
        tmp.rename(final)
        atomic_write_text(final / MARKER_FILE, json.dumps(files, indent=1))
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    _barrier()
    return final


def seal_trainer_checkpoint(saved: Path, root: Path, step: int, keep: int) -> Path:
    """Make the folder transformers' ``Trainer`` just saved (``checkpoint-N``: weights, optimizer,
    scheduler, RNG and its own trainer state) step ``step``'s checkpoint under ``root``: moved
    (not copied) into ``hf_trainer/`` of a new step folder, sealed with the marker, so that
    ``find_latest``, the store's mirror and a resume on another machine treat it like any other.
    Rank 0 calls it once every process finished saving (``alignment/align.py``)."""
    final = step_folder(root, step)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    Path(saved).rename(tmp / TRAINER_DIR)
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, "format": TRAINER_DIR}))
    files = _hash_files(tmp, shared=False)
    for folder in {tmp, *(p.parent for p in tmp.rglob("*") if p.is_file())}:
        fsync_dir(folder)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    atomic_write_text(final / MARKER_FILE, json.dumps(files, indent=1))
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final


def _hash_files(folder: Path, shared: bool) -> dict[str, dict]:
    """Relative path -> size and sha256 of every file under ``folder``. ``shared``: every process
    wrote into ``folder`` (a sharded save, on a file system they all see), so each hashes a
    strided share of rank 0's listing and rank 0 gathers them; otherwise rank 0 alone."""
    def hashed(names):
        return {n: {"size": (folder / n).stat().st_size, "sha256": file_digest(folder / n)} for n in names}

    rank = _rank()
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) if rank == 0 else None
    if not (shared and _distributed()):
        return hashed(names) if rank == 0 else {}
    world = dist.get_world_size()
    listing = [names]
    dist.broadcast_object_list(listing, src=0)
    shares = [None] * world
    dist.all_gather_object(shares, hashed(listing[0][rank::world]))
    return {n: info for share in shares for n, info in sorted(share.items())}


def _flat_tensors(model_state: dict, optimizer_state: dict) -> dict[str, torch.Tensor]:
    """One flat name -> tensor dict of a model's and its optimizer's (possibly sharded) states:
    ``model.<parameter>`` and ``optimizer.<parameter>.<exp_avg|exp_avg_sq|step>``. The values are
    the state dicts' own tensors, so loading into this dict fills the state dicts in place."""
    tensors = {f"{_MODEL_KEY}{name}": value for name, value in model_state.items()}
    for parameter, moments in optimizer_state["state"].items():
        tensors |= {f"{_OPTIMIZER_KEY}{parameter}.{name}": value for name, value in moments.items()}
    return tensors


def _save_sharded(folder: Path, model: torch.nn.Module, optimizer, scheduler) -> None:
    from torch.distributed.checkpoint import HuggingFaceStorageWriter, save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)  # sharded (DTensor) states, keyed by name
    save(_flat_tensors(model_state, optimizer_state),
         storage_writer=HuggingFaceStorageWriter(str(folder / SHARDED_DIR), save_distributed=True))
    if _rank() == 0:
        torch.save({"param_groups": optimizer_state["param_groups"], "scheduler": scheduler.state_dict()},
                   folder / OPTIMIZER_FILE)


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
    sharded = any(name.startswith(f"{SHARDED_DIR}/") for name in files)
    if any(name.startswith(f"{TRAINER_DIR}/") for name in files):
        required = (STATE_FILE, f"{TRAINER_DIR}/trainer_state.json")
    else:
        required = (OPTIMIZER_FILE, RNG_FILE, STATE_FILE) + (() if sharded else (MODEL_FILE,))
    for name in required:
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
    """Restore weights, optimizer, scheduler and RNG state in place; every process calls it.
    ``sharded``: ``model`` is FSDP-sharded. Either kind of checkpoint loads into either kind of model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    states = torch.load(checkpoint.path / OPTIMIZER_FILE, weights_only=True)
    if checkpoint.sharded:
        from torch.distributed.checkpoint import HuggingFaceStorageReader, load
        from torch.distributed.checkpoint.state_dict import get_state_dict

        # The states to fill, laid out as this run holds them (sharded or whole); the optimizer's
        # moments exist only after a step, which get_state_dict takes with zero gradients and lr.
        model_state, optimizer_state = get_state_dict(model, optimizer)
        with warnings.catch_warnings():  # in one process it says it "assumes the intent": the intent it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            load(_flat_tensors(model_state, optimizer_state),
                 storage_reader=HuggingFaceStorageReader(str(checkpoint.path / SHARDED_DIR)), no_dist=not _distributed())
        optimizer_state["param_groups"] = states["param_groups"]
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    elif sharded:
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
