"""The recipe's ``evaluate`` section, and the MQAR training recipe (recipes/mqar/tiny.yaml).

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

from model.spec import ModelSpec, Section, TrainSpec, field_error

SECTIONS = ("quality", "tasks", "recall", "efficiency")
SectionName = Literal["quality", "tasks", "recall", "efficiency"]


class QualitySpec(Section):
    """Held-out loss on the recipe's validation split; KL and greedy agreement with the teacher."""

    validation_rows: PositiveInt | None = Field(
        64,
        description="Rows of `data.seq_len` tokens, from the start of the validation split, on which loss, "
                    "next-token accuracy and KL to the teacher are measured; null uses the whole split.",
    )
    micro_batch_size: PositiveInt = Field(8, description="Rows per forward pass while measuring on those rows.")
    generation_prompts: PositiveInt = Field(
        16,
        description="Held-out prompts for greedy agreement with the teacher, from rows spread evenly over the "
                    "validation split (a row too short for a prompt is skipped). Measured only when a teacher is "
                    "evaluated alongside.",
    )
    prompt_tokens: PositiveInt = Field(
        32, description="Each prompt is the first `prompt_tokens` tokens of its validation row.",
    )
    generation_tokens: PositiveInt = Field(
        32, description="Greedy tokens the teacher and the student each generate per prompt.",
    )


class TasksSpec(Section):
    """lm-evaluation-harness tasks, run through its standard ``hf`` model type.

    ``factory_local`` is the tag of the tasks this package generates (offline); any task
    lm-eval knows (``mmlu``, ``hellaswag``, ``arc_easy``, ``piqa``, ``winogrande``,
    ``gsm8k``, ``ruler``...) works where its dataset is reachable or cached.
    """

    names: list[str] = Field(
        default_factory=lambda: ["factory_local"],
        description="lm-eval task or tag names to run; `factory_local` is the offline tasks this package "
                    "generates. A name lm-eval does not know is an error before any model loads.",
    )
    num_fewshot: int | None = Field(
        None, ge=0, description="Few-shot examples per prompt for every task; null: each task's own default.",
    )
    limit: PositiveInt | None = Field(
        None, description="At most this many documents per task (a smoke run); null runs every document.",
    )
    batch_size: PositiveInt = Field(8, description="lm-eval's batch size.")
    local_items: PositiveInt = Field(64, description="Documents in each generated `factory_local` task.")
    seed: int = Field(0, description="Seeds the documents of the generated `factory_local` tasks.")


class RecallSpec(Section):
    """MQAR over a grid of (sequence length, key-value pairs), and passkey at several lengths."""

    mqar_seq_lens: list[PositiveInt] = Field(
        default_factory=lambda: [64, 128, 256],
        description="MQAR sequence lengths; with `mqar_kv_pairs` they form the grid. A point that cannot be built "
                    "(an odd length, fewer than 4 tokens per key-value pair, too small a vocabulary) is skipped.",
    )
    mqar_kv_pairs: list[PositiveInt] = Field(
        default_factory=lambda: [4, 8, 16],
        description="Key-value pairs per MQAR sequence (each key is then queried once).",
    )
    mqar_examples: PositiveInt = Field(32, description="Generated MQAR sequences per grid point.")
    passkey_context_lengths: list[PositiveInt] = Field(
        default_factory=lambda: [256, 512, 1024],
        description="Passkey prompt lengths, in tokens; each must hold the instruction, the needle, the question "
                    "and some filler in the model's tokenizer (checked before any model loads).",
    )
    passkey_trials: PositiveInt = Field(
        5, description="Passkey prompts per context length, each with its needle at a random depth.",
    )
    passkey_digits: int = Field(
        5, ge=1, le=9,
        description="Digits of each pass key; a trial passes when the first integer of the greedy answer is the "
                    "key.",
    )
    batch_size: PositiveInt = Field(
        16, description="MQAR sequences per forward pass (passkey prompts run one at a time).",
    )
    seed: int = Field(0, description="Seeds the MQAR sequences and the passkey prompts.")


class EfficiencySpec(Section):
    """Prefill and decode throughput, cache bytes and peak memory at each (batch, context)."""

    batch_sizes: list[PositiveInt] = Field(
        default_factory=lambda: [1, 8],
        description="Batch sizes to measure; every (batch size, context length) pair is one point.",
    )
    context_lengths: list[PositiveInt] = Field(
        default_factory=lambda: [128, 512],
        description="Prompt lengths, in tokens (random ids), prefilled at each point.",
    )
    decode_tokens: PositiveInt = Field(
        16, description="Tokens generated after the prefill, one step at a time, for the decode timing.",
    )
    warmup: int = Field(
        1, ge=0, description="Untimed runs of each point before the timed ones (allocator, kernels, caches).",
    )
    repeats: PositiveInt = Field(3, description="Timed runs of each point; the median time is reported.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="The dtype the model is cast to for these measurements, and in which lm-eval loads it for "
                    "`tasks`; `auto`: bfloat16 on CUDA, float32 on the CPU.",
    )
    threads: PositiveInt | None = Field(
        None,
        description="CPU threads torch uses while timing; null keeps torch's default. Use 1 on a shared machine: "
                    "OpenMP threads that wait for busy cores slowed decode up to 20x in our trials.",
    )


class GateSpec(Section):
    """Promotion gate: every threshold that is set must hold, or the candidate fails.

    Ratios compare a candidate with the run's teacher: ``val_loss_ratio`` is candidate /
    teacher validation loss; a speedup is candidate / teacher tokens per second at every
    measured (batch, context) point, and the smallest one must meet the threshold.
    """

    max_val_loss: float | None = Field(
        None, gt=0,
        description="Highest validation loss (nats per token) the candidate may have; null: not checked.",
    )
    max_val_loss_ratio: float | None = Field(
        None, gt=0,
        description="Highest candidate / teacher validation loss, e.g. 1.1 allows 10% more; null: not checked.",
    )
    max_kl_to_teacher: float | None = Field(
        None, ge=0,
        description="Highest forward KL(teacher || candidate) per validation token, in nats; null: not checked.",
    )
    min_greedy_agreement: float | None = Field(
        None, ge=0, le=1,
        description="Lowest fraction of the teacher's greedy tokens that the candidate also ranks first, fed the "
                    "teacher's continuation; null: not checked.",
    )
    min_decode_speedup: float | None = Field(
        None, gt=0,
        description="Lowest candidate / teacher decode tokens per second, at every (batch, context) point measured "
                    "for both; null: not checked.",
    )
    min_prefill_speedup: float | None = Field(
        None, gt=0,
        description="Lowest candidate / teacher prefill tokens per second, at every (batch, context) point "
                    "measured for both; null: not checked.",
    )
    max_cache_bytes_ratio: float | None = Field(
        None, gt=0,
        description="Highest candidate / teacher cache bytes per sequence (KV cache and Mamba state), at every "
                    "point measured for both; null: not checked.",
    )
    min_mqar_accuracy: float | None = Field(
        None, ge=0, le=1, description="Lowest MQAR accuracy, the mean over the grid; null: not checked.",
    )
    min_passkey_accuracy: float | None = Field(
        None, ge=0, le=1,
        description="Lowest passkey accuracy, the mean over the context lengths; null: not checked.",
    )
    min_task_scores: dict[str, float] = Field(
        default_factory=dict,
        description="Lowest lm-eval scores, keyed by `task` (its `acc`, else its first reported metric) or "
                    "`task/metric`; empty: none checked.",
    )

    def thresholds(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if v not in (None, {})}


class EvaluateSpec(Section):
    """What the evaluate stage measures, and the gate a candidate must pass."""

    sections: list[SectionName] = Field(
        default_factory=lambda: list(SECTIONS),
        description="What to measure: `quality` (held-out loss; KL and greedy agreement with the teacher), "
                    "`tasks` (lm-eval), `recall` (MQAR and passkey), `efficiency` (throughput, cache bytes, peak "
                    "memory). A gate threshold needs its section.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="`auto`: CUDA when torch sees a GPU, else the CPU (a worker may pin it with FACTORY_DEVICE); "
                    "`cpu` or `cuda` choose it.",
    )
    quality: QualitySpec = Field(
        QualitySpec(),
        description="Held-out loss and accuracy, and KL and greedy agreement with the teacher; used when `quality` "
                    "is in `sections`.",
    )
    tasks: TasksSpec = Field(
        TasksSpec(), description="lm-evaluation-harness tasks; used when `tasks` is in `sections`.",
    )
    recall: RecallSpec = Field(
        RecallSpec(), description="MQAR and passkey recall; used when `recall` is in `sections`.",
    )
    efficiency: EfficiencySpec = Field(
        EfficiencySpec(),
        description="Prefill and decode throughput, cache bytes and peak memory; used when `efficiency` is in "
                    "`sections` (its `dtype` also applies to `tasks`).",
    )
    gate: GateSpec = Field(
        GateSpec(),
        description="The thresholds a candidate must meet to pass; one that cannot be checked (no teacher to "
                    "compare with, a metric not measured) fails.",
    )

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

    vocab_size: PositiveInt = Field(
        256,
        description="Token ids of the data, also every model's vocabulary size: keys from the lower half of ids "
                    "1..V-1, values from the upper half (0 marks empty slots).",
    )
    seq_len: PositiveInt = Field(
        64, description="Tokens per training sequence: the key-value pairs first, then one query per key.",
    )
    num_kv_pairs: PositiveInt = Field(4, description="Key-value pairs per training sequence.")
    train_examples: PositiveInt = Field(
        20_000, description="Training sequences, generated once and reused by every model.",
    )
    test_examples: PositiveInt = Field(
        256, description="Test sequences per point of the evaluation grid, generated with seed + 1.",
    )
    seed: int = Field(0, description="Seeds the training sequences; the test sequences use seed + 1.")


class MQARRecipe(Section):
    """Train each model of ``models`` on MQAR with the same data and loop, then score it on a grid.

    The recipe of recipes/mqar/tiny.yaml; ``python bench/eval_mqar.py RECIPE`` runs it."""

    name: str = Field(
        "mqar", description="Name of the results folder, under bench/eval_mqar.py's --out (bench/results).",
    )
    task: MQARTaskSpec = Field(MQARTaskSpec(), description="The MQAR training and test data.")
    models: dict[str, ModelSpec] = Field(
        description="Required: the models to train and compare, by name, each a model section (family, preset, "
                    "overrides) whose vocab_size comes from `task`.",
    )
    train: TrainSpec = Field(
        TrainSpec(steps=600, batch_size=64, micro_batch_size=64, lr=1e-2, warmup_steps=30,
                  checkpoint_every=200, eval_every=200),
        description="The training loop every model runs (MQAR has no validation split, so no validation loss is "
                    "measured); by default 600 steps of 64 sequences at lr 1e-2.",
    )
    eval_seq_lens: list[PositiveInt] = Field(
        default_factory=lambda: [64, 128, 256], description="Sequence lengths of the evaluation grid.",
    )
    eval_kv_pairs: list[PositiveInt] = Field(
        default_factory=lambda: [4, 8, 16], description="Key-value pair counts of the evaluation grid.",
    )
