"""Recipe sections read by ``model/``: data, tokenizer, model, train.

Each is a pydantic model that rejects unknown fields, so a typo in a recipe is an error
naming the field, never a silently ignored knob. ``flows/recipe.py`` composes them (with
the compression, distillation, evaluation and registry sections) into a ``Recipe``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from model.device import Precision
from model.digests import PLACEMENT


class Section(BaseModel):
    """Base of every recipe section: an unknown field is an error naming it, and a parsed section is immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(Section):
    """Where the training text comes from and how it is cut into sequences.

    ``source`` is one of:
      - ``builtin:stdlib``: the running interpreter's standard library (``Lib/**.py``,
        ``pydoc_data``, without its tests) - real code and prose on any machine, no download;
      - ``builtin:stdlib-with-tests``: the same with the standard library's test folders;
      - a local file or folder of ``.txt``/``.md``/``.rst``/``.py`` (a document per file),
        ``.jsonl`` (a document per line, ``text_field``) or ``.parquet`` (``text_field`` column);
      - ``hf:NAME`` or ``hf:NAME:SPLIT``: a Hugging Face dataset (available offline when cached);
      - ``s3://bucket/prefix``: every object under the prefix, read with boto3.
    """

    source: str = Field(
        "builtin:stdlib",
        description="Where the text comes from: `builtin:stdlib` (this Python's standard library, no download), "
                    "`builtin:stdlib-with-tests`, a local file or folder (.txt/.md/.rst/.py: a document per file; "
                    ".jsonl: per line; .parquet: per row), `hf:NAME` or `hf:NAME:SPLIT` (a Hugging Face dataset), "
                    "or `s3://bucket/prefix` (every object under it). A local path must exist when the recipe is "
                    "loaded.",
    )
    text_field: str = Field(
        "text",
        description="The text column of `.jsonl` and `.parquet` files (local or on S3) and of `hf:` datasets; "
                    "other files are read whole, one document each.",
    )
    seq_len: PositiveInt = Field(
        256,
        description="Tokens per row: documents, each followed by an EOS token, are concatenated and cut into rows "
                    "of this length. Every stage that reads the data (training, importance, search, distillation, "
                    "quality evaluation) sees rows of this length.",
    )
    validation_fraction: float = Field(
        0.02, gt=0, lt=1,
        description="Fraction of documents held out as the validation split, chosen by a hash of each document's "
                    "text, so a document always lands on the same side. The tokenizer is trained on the rest.",
    )
    max_documents: PositiveInt | None = Field(
        None,
        description="Use only the first N documents of the source, in source order; null uses every document.",
    )

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

    vocab_size: PositiveInt = Field(
        4096,
        description="Vocabulary size of the byte-level BPE trained on the training split (at least 300: 256 byte "
                    "tokens plus special tokens and merges). Not used when `path` is set or the recipe has "
                    "`start_from`.",
    )
    path: str | None = Field(
        None,
        description="A folder with an HF tokenizer (`tokenizer.json`, with an EOS token) to use instead of training "
                    "a BPE; null trains one. With `start_from` the teacher's own tokenizer is used instead.",
    )
    min_frequency: PositiveInt = Field(
        2,
        description="BPE training: a pair of tokens becomes a merge only if it occurs at least this many times.",
    )

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
    ``pattern`` (e.g. ``M-M*-M-M-``). ``vocab_size`` is the tokenizer's length unless an
    override asks for more (a padded embedding, as Megatron pads to a multiple of 128). The families are listed in ``model/architectures.py``, their presets in ``model/nemotron_h.py``
    and ``model/hymba/``.
    """

    family: str = Field(
        "nemotron_h",
        description="Architecture family, a key of `model/architectures.py`'s FAMILIES (`nemotron_h` or `hymba`). "
                    "Both can be compressed (Hymba's axes: docs/compression.md, section 7).",
    )
    preset: str = Field(
        "tiny",
        description="A named shape of the family: small CPU shapes such as `tiny` and `micro`, or published ones "
                    "such as `nemotron-h-8b` or `hymba-1.5b`.",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Config fields that replace the preset's values, e.g. `{hidden_size: 64, num_attention_heads: 4}`. "
                    "For `nemotron_h`, `pattern` is the layer code (`M` Mamba-2, `*` attention, `-` FFN, `E` MoE). "
                    "`vocab_size` is the tokenizer's length; an override may only raise it (rows the tokenizer never "
                    "produces, e.g. Nemotron-H's 131,072 over a smaller tokenizer).",
    )

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

    steps: PositiveInt = Field(
        200,
        description="Optimizer steps to run. Each step reads `batch_size` rows; the rows are reshuffled and "
                    "read again once every row has been seen.",
    )
    batch_size: PositiveInt = Field(
        16,
        description="Global batch: rows (sequences) per optimizer step, over all processes together. Must be a "
                    "multiple of `micro_batch_size` x `num_processes`.",
    )
    micro_batch_size: PositiveInt = Field(
        8,
        description="Rows per forward and backward pass in each process; gradients are accumulated over "
                    "`batch_size / (micro_batch_size x num_processes)` passes per step. Also the batch of the "
                    "validation-loss passes.",
    )
    lr: float = Field(3e-3, gt=0, description="Peak AdamW learning rate, reached at the end of warmup.")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1,
        description="Final learning rate as a fraction of `lr`, for the `cosine` and `wsd` schedules (`constant` "
                    "ignores it).",
    )
    warmup_steps: int = Field(
        20, ge=0,
        description="Steps of linear warmup, from lr / warmup_steps at the first step up to `lr`; 0 starts at `lr`.",
    )
    schedule: Literal["cosine", "wsd", "constant"] = Field(
        "cosine",
        description="Learning rate after warmup: `cosine` decays to `min_lr_ratio` x lr at the last step; `wsd` "
                    "(warmup-stable-decay) holds `lr`, then decays linearly to `min_lr_ratio` x lr over the last "
                    "`decay_fraction` of the steps; `constant` holds `lr`.",
    )
    decay_fraction: float = Field(
        0.2, gt=0, le=1,
        description="`wsd` only: the fraction of all steps, at the end of the run, over which the learning rate "
                    "decays.",
    )
    weight_decay: float = Field(
        0.1, ge=0,
        description="AdamW weight decay, applied to matrices and embeddings only (not to norms, biases or the "
                    "per-head Mamba scalars).",
    )
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW's (beta1, beta2).")
    grad_clip: float = Field(
        1.0, ge=0,
        description="Clip the global gradient norm to this value before each step; 0 disables clipping.",
    )
    seed: int = Field(
        0,
        description="Seeds the data order and, where a model is built from scratch (pretraining, MQAR), its "
                    "initial weights.",
    )
    checkpoint_every: PositiveInt = Field(
        50, json_schema_extra=PLACEMENT,
        description="Save a resumable checkpoint (weights, optimizer, scheduler and RNG state) every N steps and at "
                    "the last step; an interrupted run resumes from the newest complete one.",
    )
    keep_checkpoints: PositiveInt = Field(
        2, json_schema_extra=PLACEMENT,
        description="How many of the newest checkpoints to keep, on the local disk and, where the artifact root is "
                    "`s3://`, in the store; older ones are deleted.",
    )
    eval_every: PositiveInt = Field(
        100,
        description="Measure the validation loss every N steps and at the last step (where the stage has a "
                    "validation split).",
    )
    eval_batches: PositiveInt = Field(
        8,
        description="The validation loss is measured on the first `eval_batches` x `micro_batch_size` rows of the "
                    "validation split.",
    )
    num_processes: PositiveInt = Field(
        1, json_schema_extra=PLACEMENT,
        description="Training processes on this machine; more than 1 launches "
                    "`torchrun --standalone --nproc_per_node=N` (on CUDA, one GPU per process).",
    )
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp", json_schema_extra=PLACEMENT,
        description="With several processes: `ddp` keeps a whole model replica in each process; `fsdp` (FSDP2, "
                    "one shard unit per decoder block) shards weights, gradients and AdamW state, for models whose "
                    "~16 bytes per parameter of training state do not fit one GPU (8B: ~128 GB).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", json_schema_extra=PLACEMENT,
        description="`auto`: CUDA when torch sees a GPU, else the CPU (a worker may pin it with FACTORY_DEVICE); "
                    "`cpu` or `cuda` choose it, and `cuda` without a GPU is an error.",
    )
    precision: Precision = Field(
        "auto",
        description="`auto`: `bf16` on CUDA, `fp32` on the CPU; `bf16`: bfloat16 autocast over float32 master "
                    "weights, checkpoint saved in bfloat16; `fp32`: float32 throughout (TF32 matmuls on CUDA); "
                    "`fp8`: float8 linear layers (torchao) with bfloat16 autocast for the rest, on a CUDA GPU of "
                    "compute capability 8.9+ (Ada, Hopper) only, refused elsewhere before any work.",
    )

    activation_checkpointing: bool = Field(
        False, json_schema_extra=PLACEMENT,
        description="Keep only each decoder block's input and recompute the block in backward (transformers' "
                    "gradient checkpointing): activation memory of a few tensors per layer instead of every "
                    "intermediate, for about a third more compute. Needed for long sequences at the published "
                    "widths (and for 8K tokens on a CPU, where the Mamba-2 scan's PyTorch fallback keeps large "
                    "intermediates).",
    )

    @model_validator(mode="after")
    def _fp8_needs_cuda(self):
        if self.precision == "fp8" and self.device == "cpu":
            raise field_error("precision", "'fp8' needs a CUDA GPU (compute capability 8.9+); device is 'cpu'")
        return self

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
