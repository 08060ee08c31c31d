"""The recipe's ``evaluate`` section, and the MQAR training recipe (recipes/mqar-tiny.yaml).

Every knob of an evaluation is here with a default that runs in about a minute for a tiny
model on a CPU; a bad value is an error naming its dotted path before anything loads.

    evaluate:
      sections: [quality, tasks, recall, efficiency]
      quality:    {validation_rows: 64, generation_prompts: 16}
      tasks:      {names: [factory_local], limit: null}    # any lm-eval task names
      recall:     {mqar_seq_lens: [64, 128, 256], mqar_kv_pairs: [4, 8, 16]}
      efficiency: {batch_sizes: [1, 8], context_lengths: [128, 512]}
      gate:       {max_val_loss_ratio: 1.1, min_decode_speedup: 1.2, min_mqar_accuracy: 0.5}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from model.specs import ModelSpec, Section, TrainSpec, field_error

SECTIONS = ("quality", "tasks", "recall", "efficiency")
SectionName = Literal["quality", "tasks", "recall", "efficiency"]


class QualitySpec(Section):
    """Held-out loss on the recipe's validation split; KL and greedy agreement with the teacher."""

    validation_rows: PositiveInt | None = 64  # rows of data.seq_len tokens; null = the whole split
    micro_batch_size: PositiveInt = 8
    generation_prompts: PositiveInt = 16  # held-out prompts for greedy agreement with the teacher
    prompt_tokens: PositiveInt = 32  # each prompt is the first prompt_tokens of a validation row
    generation_tokens: PositiveInt = 32  # greedy tokens generated per prompt by student and teacher


class TasksSpec(Section):
    """lm-evaluation-harness tasks, run through its standard ``hf`` model type.

    ``factory_local`` is the tag of the tasks this package generates (offline); any task
    lm-eval knows (``mmlu``, ``hellaswag``, ``arc_easy``, ``piqa``, ``winogrande``,
    ``gsm8k``, ``ruler``...) works where its dataset is reachable or cached.
    """

    names: list[str] = Field(default_factory=lambda: ["factory_local"])
    num_fewshot: int | None = Field(None, ge=0)  # null: each task's own default
    limit: PositiveInt | None = None  # at most this many documents per task (a smoke run)
    batch_size: PositiveInt = 8
    local_items: PositiveInt = 64  # documents per generated local task
    seed: int = 0


class RecallSpec(Section):
    """MQAR over a grid of (sequence length, key-value pairs), and passkey at several lengths."""

    mqar_seq_lens: list[PositiveInt] = Field(default_factory=lambda: [64, 128, 256])
    mqar_kv_pairs: list[PositiveInt] = Field(default_factory=lambda: [4, 8, 16])
    mqar_examples: PositiveInt = 32  # per grid point
    passkey_context_lengths: list[PositiveInt] = Field(default_factory=lambda: [256, 512, 1024])
    passkey_trials: PositiveInt = 5
    passkey_digits: int = Field(5, ge=1, le=9)
    batch_size: PositiveInt = 16
    seed: int = 0


class EfficiencySpec(Section):
    """Prefill and decode throughput, cache bytes and peak memory at each (batch, context)."""

    batch_sizes: list[PositiveInt] = Field(default_factory=lambda: [1, 8])
    context_lengths: list[PositiveInt] = Field(default_factory=lambda: [128, 512])
    decode_tokens: PositiveInt = 16  # tokens generated after the prefill, timed one step at a time
    warmup: int = Field(1, ge=0)  # untimed runs first (allocator, kernels, caches)
    repeats: PositiveInt = 3  # timed runs; the median is reported
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    # CPU threads while timing (null: torch's default). Use 1 on a shared machine: OpenMP threads
    # that wait for busy cores slowed decode up to 20x in our trials.
    threads: PositiveInt | None = None


class GateSpec(Section):
    """Promotion gate: every threshold that is set must hold, or the candidate fails.

    Ratios compare a candidate with the run's teacher: ``val_loss_ratio`` is candidate /
    teacher validation loss; a speedup is candidate / teacher tokens per second at every
    measured (batch, context) point, and the smallest one must meet the threshold.
    """

    max_val_loss: float | None = Field(None, gt=0)
    max_val_loss_ratio: float | None = Field(None, gt=0)
    max_kl_to_teacher: float | None = Field(None, ge=0)
    min_greedy_agreement: float | None = Field(None, ge=0, le=1)
    min_decode_speedup: float | None = Field(None, gt=0)
    min_prefill_speedup: float | None = Field(None, gt=0)
    max_cache_bytes_ratio: float | None = Field(None, gt=0)
    min_mqar_accuracy: float | None = Field(None, ge=0, le=1)  # mean over the MQAR grid
    min_passkey_accuracy: float | None = Field(None, ge=0, le=1)  # mean over context lengths
    min_task_scores: dict[str, float] = Field(default_factory=dict)  # "task" or "task/metric" -> minimum

    def thresholds(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if v not in (None, {})}


class EvaluateSpec(Section):
    """What the evaluate stage measures, and the gate a candidate must pass."""

    sections: list[SectionName] = Field(default_factory=lambda: list(SECTIONS))
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when torch sees one
    quality: QualitySpec = QualitySpec()
    tasks: TasksSpec = TasksSpec()
    recall: RecallSpec = RecallSpec()
    efficiency: EfficiencySpec = EfficiencySpec()
    gate: GateSpec = GateSpec()

    @model_validator(mode="after")
    def _gate_measurable(self):
        needs = {"max_val_loss": "quality", "max_val_loss_ratio": "quality", "max_kl_to_teacher": "quality",
                 "min_greedy_agreement": "quality", "min_decode_speedup": "efficiency",
                 "min_prefill_speedup": "efficiency", "max_cache_bytes_ratio": "efficiency",
                 "min_mqar_accuracy": "recall", "min_passkey_accuracy": "recall", "min_task_scores": "tasks"}
        for name in self.gate.thresholds():
            if needs[name] not in self.sections:
                raise field_error(f"gate.{name}", f"needs the {needs[name]!r} section, which is not in sections")
        return self


class MQARTaskSpec(Section):
    """The MQAR data a tiny model is trained on (Zoology's figure 2 uses V=8192, 100K examples)."""

    vocab_size: PositiveInt = 256
    seq_len: PositiveInt = 64
    num_kv_pairs: PositiveInt = 4
    train_examples: PositiveInt = 20_000
    test_examples: PositiveInt = 256
    seed: int = 0


class MQARRecipe(Section):
    """Train each model of ``models`` on MQAR with the same data and loop, then score it on a grid.

    The recipe of recipes/mqar-tiny.yaml; ``python bench/eval_mqar.py RECIPE`` runs it."""

    name: str = "mqar"
    task: MQARTaskSpec = MQARTaskSpec()
    models: dict[str, ModelSpec]
    train: TrainSpec = TrainSpec(steps=600, batch_size=64, micro_batch_size=64, lr=1e-2, warmup_steps=30,
                                 checkpoint_every=200, eval_every=200)
    eval_seq_lens: list[PositiveInt] = Field(default_factory=lambda: [64, 128, 256])
    eval_kv_pairs: list[PositiveInt] = Field(default_factory=lambda: [4, 8, 16])
