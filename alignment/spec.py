"""Recipe sections read by ``alignment/``: ``align`` (SFT, then preference optimisation) and
``reward_model`` (a reward head trained on a base checkpoint).

Data are named the same way in both: ``sdg`` is this recipe's synthetic datasets (``factory
sdg``); anything else is a local file or folder, or an ``s3://`` URI, holding the SDG stage's
columns (``sdg/output.py``) as ``.jsonl`` or ``.parquet``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from model.spec import Section, TrainSpec, field_error
from sdg.scorers import HELPSTEER2_ATTRIBUTES

SDG = "sdg"  # this recipe's SDG output
STUDENT, TEACHER = "student", "teacher"
DATA_SUFFIXES = (".jsonl", ".parquet")


def _data_problem(value: str) -> str | None:
    if value == SDG or value.startswith("s3://"):
        return None
    path = Path(value).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix in DATA_SUFFIXES):
        return None
    return (f"{value!r} is neither {SDG!r} (this recipe's synthetic data), an s3:// URI, a folder, nor a "
            f"{' / '.join(DATA_SUFFIXES)} file that exists")


def _checked_data(value: str) -> str:
    if problem := _data_problem(value):
        raise ValueError(problem)
    return value


def _alignment_train(steps: int, lr: float) -> TrainSpec:
    return TrainSpec(steps=steps, batch_size=8, micro_batch_size=4, lr=lr, warmup_steps=max(1, steps // 10),
                     schedule="cosine", weight_decay=0.0, checkpoint_every=max(1, steps // 4), eval_every=steps)


class SFTSpec(Section):
    """Supervised fine-tuning on (prompt, response) conversations with TRL's ``SFTTrainer``:
    the loss is on the assistant's response only (the prompt is context)."""

    data: str = Field(
        SDG,
        description=f"The SFT rows: `{SDG}` (this recipe's `factory sdg` output, `sft.jsonl`), or a folder, a "
                    "`.jsonl`/`.parquet` file or an `s3://` URI with a `messages` column (conversations ending "
                    "with the assistant's reply).",
    )
    train: TrainSpec = Field(
        default_factory=lambda: _alignment_train(60, 2e-4),
        description="The loop (TRL's trainer under the factory's checkpoints and launcher): steps, global batch, "
                    "micro batch, lr and schedule, checkpoint_every, keep_checkpoints, num_processes, device, "
                    "precision. `eval_every` is when the held-out loss is measured.",
    )
    max_length: PositiveInt = Field(512, description="Tokens per conversation; longer ones are truncated.")
    held_out_fraction: float = Field(
        0.1, ge=0, lt=1,
        description="Rows kept out of training (chosen by a hash of each row's id and `train.seed`: the same rows "
                    "whatever the order) to measure the loss before and after.",
    )

    _check_data = field_validator("data")(classmethod(lambda cls, v: _checked_data(v)))


class PreferenceSpec(Section):
    """Preference optimisation on (prompt, chosen, rejected) pairs with TRL's ``DPOTrainer``,
    against a frozen copy of the model it starts from (the reference)."""

    data: str = Field(
        SDG,
        description=f"The pairs: `{SDG}` (this recipe's `preference.jsonl`), or a folder, file or `s3://` URI with "
                    "`prompt_messages`, `chosen_response` and `rejected_response` columns.",
    )
    loss: list[str] = Field(
        ["sigmoid"],
        description="TRL's DPO loss types, combined with `loss_weights`: `sigmoid` is DPO (Rafailov et al.), "
                    "`ipo`, `hinge`, `robust`, ... and `sft` adds the NLL of the chosen response (with `sigmoid`: "
                    "Pang et al.'s RPO). Nemotron-4's reward-aware RPO is not among them.",
    )
    loss_weights: list[PositiveFloat] | None = Field(None, description="One weight per `loss` entry; null: all 1.")
    beta: PositiveFloat = Field(
        0.1, description="How far the policy may move from the reference: the KL penalty's inverse temperature.",
    )
    train: TrainSpec = Field(default_factory=lambda: _alignment_train(40, 5e-5),
                             description="The loop, as for `sft.train`.")
    max_length: PositiveInt = Field(512, description="Tokens of prompt plus response; longer pairs are truncated.")
    held_out_fraction: float = Field(0.2, ge=0, lt=1,
                                     description="Pairs kept out of training to measure margin and accuracy.")

    _check_data = field_validator("data")(classmethod(lambda cls, v: _checked_data(v)))

    @model_validator(mode="after")
    def _weights_match(self):
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss):
            raise field_error("loss_weights", f"{len(self.loss_weights)} weights for {len(self.loss)} loss types")
        return self


class AlignSpec(Section):
    """``align`` in a recipe: SFT then preference optimisation of one model (Nemotron-4 340B's
    alignment, with TRL's trainers). Either step may be null; not both."""

    model: str = Field(
        STUDENT,
        description=f"The model to align: `{STUDENT}` (this recipe's distilled student), `{TEACHER}`, a checkpoint "
                    "folder, `s3://...` or `models:/NAME/VERSION` / `models:/NAME@ALIAS` (a registered version: "
                    "the aligned model's lineage names it).",
    )
    sft: SFTSpec | None = Field(default_factory=SFTSpec, description="Supervised fine-tuning first; null: none.")
    preference: PreferenceSpec | None = Field(
        default_factory=PreferenceSpec, description="Then preference optimisation (DPO); null: none.",
    )

    @model_validator(mode="after")
    def _something(self):
        if self.sft is None and self.preference is None:
            raise field_error("sft", "align needs `sft`, `preference` or both")
        return self

    def steps(self) -> list[tuple[str, SFTSpec | PreferenceSpec]]:
        """(name, spec) of the steps that run, in order."""
        return [(name, spec) for name, spec in (("sft", self.sft), ("preference", self.preference)) if spec]

    def describe(self) -> str:
        parts = [f"{name} {spec.train.steps} steps on {spec.data}" for name, spec in self.steps()]
        if self.preference is not None:
            parts[-1] += f" ({'+'.join(self.preference.loss)}, beta {self.preference.beta:g})"
        return f"{self.model}: " + ", then ".join(parts)


class RewardSpec(Section):
    """``reward_model`` in a recipe: a linear reward head on a base checkpoint's last hidden
    state (the format ``sdg/scorers.py: RewardModel`` reads), trained on pairs or on attribute labels."""

    base: str = Field(
        TEACHER,
        description=f"The checkpoint under the head: `{TEACHER}`, `{STUDENT}`, a folder, `s3://...` or `models:/...`.",
    )
    data: str = Field(
        SDG,
        description=f"`{SDG}` (this recipe's preference pairs), or a folder, file or `s3://` URI: preference pairs "
                    "(`prompt_messages`, `chosen_response`, `rejected_response`) for `bradley_terry`, or rows with "
                    "`messages` (or `prompt` + `response`) and one column per attribute for `regression` "
                    "(HelpSteer2's layout).",
    )
    objective: Literal["bradley_terry", "regression"] = Field(
        "bradley_terry",
        description="`bradley_terry`: one score, trained so the chosen response outscores the rejected one "
                    "(-log sigmoid of the difference); `regression`: one output per attribute, mean squared error "
                    "to the labels (Nemotron-4's reward model).",
    )
    attributes: list[str] = Field(
        list(HELPSTEER2_ATTRIBUTES), min_length=1,
        description="`regression`: the attribute columns to predict (HelpSteer2's five by default).",
    )
    steps: PositiveInt = Field(200, description="Optimizer steps of the head (the base stays frozen: its "
                                                "features are computed once).")
    batch_size: PositiveInt = Field(16, description="Pairs (or rows) per step.")
    lr: PositiveFloat = Field(1e-3, description="AdamW learning rate of the head, on standardised features.")
    max_length: PositiveInt = Field(512, description="Tokens per conversation; longer ones keep their end.")
    held_out_fraction: float = Field(
        0.2, ge=0, lt=1,
        description="Pairs (rows) kept out of training to measure accuracy (and per-attribute error), chosen by a "
                    "hash of each row's id and the seed: the same rows whatever the order.",
    )
    seed: int = Field(0, description="Seeds the head's initialisation, the data order and the held-out split.")

    _check_data = field_validator("data")(classmethod(lambda cls, v: _checked_data(v)))
