"""Recipe sections read by ``model/``: data, tokenizer, model, train.

Each is a pydantic model that rejects unknown fields, so a typo in a recipe is an error
naming the field, never a silently ignored knob. ``flows/recipe.py`` composes them (with
the compression, distillation, evaluation and registry sections) into a ``Recipe``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(Section):
    """Where the training text comes from and how it is cut into sequences.

    ``source`` is one of:
      - ``builtin:stdlib``: the running interpreter's standard library (``Lib/**.py``,
        ``pydoc_data``, without its tests) - real code and prose on any machine, no download;
      - a local file or folder of ``.txt``/``.md``/``.py`` (a document per file),
        ``.jsonl`` (a document per line, ``text_field``) or ``.parquet`` (``text_field`` column);
      - ``hf:NAME`` or ``hf:NAME:SPLIT``: a Hugging Face dataset (available offline when cached);
      - ``s3://bucket/prefix``: every object under the prefix, read with boto3.
    """

    source: str = "builtin:stdlib"
    text_field: str = "text"
    seq_len: PositiveInt = 256
    validation_fraction: float = Field(0.02, gt=0, lt=1)
    max_documents: PositiveInt | None = None  # the first N documents in source order

    @field_validator("source")
    @classmethod
    def _source_exists(cls, source: str) -> str:
        if source.startswith(("builtin:", "hf:", "s3://")):
            if source.startswith("builtin:") and source not in BUILTIN_SOURCES:
                raise ValueError(f"unknown built-in corpus {source!r}; choose one of {sorted(BUILTIN_SOURCES)}")
            return source
        path = Path(source).expanduser()
        if not path.exists():
            raise ValueError(f"data path does not exist: {source}")
        if path.is_dir() and not any(p.suffix in DOCUMENT_SUFFIXES for p in path.rglob("*") if p.is_file()):
            raise ValueError(f"no {'/'.join(sorted(DOCUMENT_SUFFIXES))} files in {source}")
        return source


BUILTIN_SOURCES = {"builtin:stdlib", "builtin:stdlib-with-tests"}
# Files a folder source reads: a document per text file, per JSONL line, per Parquet row.
DOCUMENT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".jsonl", ".parquet"}


class TokenizerSpec(Section):
    """Train a byte-level BPE on the training split, or load an existing tokenizer folder."""

    vocab_size: PositiveInt = 4096
    path: str | None = None  # a folder with tokenizer.json (an HF tokenizer); skips training
    min_frequency: PositiveInt = 2

    @field_validator("vocab_size")
    @classmethod
    def _vocab_room(cls, vocab_size: int) -> int:
        if vocab_size < 300:
            raise ValueError("must be at least 300 (256 byte tokens plus special tokens and merges)")
        return vocab_size

    @field_validator("path")
    @classmethod
    def _tokenizer_exists(cls, path: str | None) -> str | None:
        if path is not None and not (Path(path).expanduser() / "tokenizer.json").is_file():
            raise ValueError(f"no tokenizer.json in {path}")
        return path


class ModelSpec(Section):
    """An architecture: a family, one of its presets, and per-field overrides of its config.

    For ``family: nemotron_h`` the overrides are ``NemotronHConfig`` fields, plus
    ``pattern`` (e.g. ``M-M*-M-M-``). ``vocab_size`` always comes from the tokenizer.
    The families and their presets are listed in ``model/architectures.py``.
    """

    family: str = "nemotron_h"
    preset: str = "tiny"
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _buildable(self):
        from model.architectures import FAMILIES

        if self.family not in FAMILIES:
            raise field_error("family", f"unknown model family {self.family!r}; choose one of {sorted(FAMILIES)}")
        family = FAMILIES[self.family]
        if self.preset not in family.presets:
            raise field_error("preset", f"unknown {self.family} preset {self.preset!r}; choose one of {sorted(family.presets)}")
        unknown = sorted(set(self.overrides) - family.config_fields)
        if unknown:
            raise FieldErrors({f"overrides.{k}": f"not a {self.family} config field" for k in unknown})
        try:
            config = family.build_config(self.preset, self.overrides)
        except (ValueError, TypeError) as e:
            raise field_error("overrides", str(e)) from None
        problems = family.config_problems(config)
        if problems:
            raise FieldErrors({f"overrides.{k}": v for k, v in problems.items()})
        return self


class TrainSpec(Section):
    """The pretraining loop (nanoGPT-style; every knob is here).

    ``batch_size`` is the global batch in sequences per optimizer step; it is the same
    whatever the number of processes, so a run on 1 or N processes follows the same curve.
    Each process runs ``micro_batch_size`` sequences per forward and accumulates
    ``batch_size / (micro_batch_size * num_processes)`` of them.
    """

    steps: PositiveInt = 200
    batch_size: PositiveInt = 16
    micro_batch_size: PositiveInt = 8
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = Field(0.2, gt=0, le=1)  # WSD: the last fraction of steps decays
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    seed: int = 0
    checkpoint_every: PositiveInt = 50
    keep_checkpoints: PositiveInt = 2
    eval_every: PositiveInt = 100
    eval_batches: PositiveInt = 8
    num_processes: PositiveInt = 1  # >1 launches torchrun --nproc_per_node=N
    # With several processes: "ddp" keeps a whole replica per process; "fsdp" (FSDP2
    # fully_shard per decoder block) shards weights, gradients and AdamW state, for models
    # whose ~16 bytes per parameter of training state do not fit one GPU (8B: ~128 GB).
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU

    @model_validator(mode="after")
    def _batches_divide(self):
        per_step = self.micro_batch_size * self.num_processes
        if self.batch_size % per_step:
            raise field_error(
                "batch_size",
                f"must be a multiple of micro_batch_size x num_processes ({per_step}), got {self.batch_size}",
            )
        return self

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // (self.micro_batch_size * self.num_processes)


class FieldErrors(ValueError):
    """Errors keyed by a path relative to the section: pydantic reports them with the section's path."""

    def __init__(self, errors: dict[str, str]):
        self.errors = errors
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))


def field_error(path: str, message: str) -> FieldErrors:
    return FieldErrors({path: message})
