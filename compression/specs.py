"""Recipe sections read by ``compression/``: ``compress`` (importance, a target or a search)
and ``distill``.

``PruneTarget`` names the sizes of the student; fields left out keep the teacher's size.
Whether a target fits a given teacher can only be checked against its config, so
``compression.prune.target_problems(config, target)`` does that before any work.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from model.specs import Section, TrainSpec, field_error


class ImportanceSpec(Section):
    """One calibration pass with forward hooks (reference/compression.md, section 1.3).

    ``aggregation`` reduces activations (batch, seq, channel) to a score per channel:
    ``l2_mean`` (the papers' choice: mean |x| over the sequence, then L2 over the batch),
    ``mean_mean`` or ``variance`` (for ablations). ``method: random`` replaces every score
    with seeded noise, the baseline that importance must beat.
    """

    samples: PositiveInt = 64  # calibration sequences (the paper: 1024 x 8192 tokens)
    batch_size: PositiveInt = 8
    aggregation: Literal["l2_mean", "mean_mean", "variance"] = "l2_mean"
    ffn_activation: Literal["pre", "post"] = "pre"  # up_proj output (paper) or down_proj input
    layer_samples: PositiveInt = 16  # sequences for the per-layer KL (num_layers + 1 passes each)
    method: Literal["activation", "random"] = "activation"
    seed: int = 0


class PruneTarget(Section):
    """The student's sizes. Omitted fields keep the teacher's value.

    Depth: ``num_layers`` keeps that many layers, dropping the least important by
    ``layer_metric``; or ``drop_layers`` lists layer indices to drop. Mamba heads are kept
    in equal numbers per group, each in its own group (``mamba_head_selection:
    group_aware``); ``global`` ranks heads across groups and packs the winners by
    position, the naive method the Minitron-SSM paper argues against (ablation only).
    """

    hidden_size: PositiveInt | None = None
    intermediate_size: PositiveInt | None = None
    num_attention_heads: PositiveInt | None = None
    mamba_num_heads: PositiveInt | None = None
    mamba_head_dim: PositiveInt | None = None
    num_layers: PositiveInt | None = None
    drop_layers: list[int] | None = None
    layer_metric: Literal["kl", "cosine"] = "kl"
    mamba_head_selection: Literal["group_aware", "global"] = "group_aware"

    @model_validator(mode="after")
    def _one_depth_rule(self):
        if self.num_layers is not None and self.drop_layers is not None:
            raise field_error("drop_layers", "give num_layers or drop_layers, not both")
        if self.drop_layers is not None and len(set(self.drop_layers)) != len(self.drop_layers):
            raise field_error("drop_layers", f"lists a layer twice: {self.drop_layers}")
        return self


class DistillSpec(Section):
    """``distill`` in a recipe. ``train`` is the loop's spec (steps, lr, batch, checkpoints)."""

    train: TrainSpec = Field(default_factory=lambda: TrainSpec(steps=100, lr=1e-3, warmup_steps=10))
    # top_k: the teacher's k largest logits, renormalized; the student's log-probabilities stay
    # over the full vocabulary, so its mass outside those k ids is penalized.
    temperature: PositiveFloat = 1.0
    ce_weight: float = Field(0.0, ge=0)
    top_k: PositiveInt | None = None
    cosine_weight: float = Field(0.0, ge=0)

    @field_validator("top_k")
    @classmethod
    def _top_k_room(cls, top_k):
        if top_k is not None and top_k < 2:
            raise ValueError("must be at least 2 (a distribution over one token carries no signal)")
        return top_k


class SearchSpace(Section):
    """Choices per axis; an empty list keeps the teacher's value. ``num_layers`` keeps that many
    layers, dropping the least important; ``keep_attention_layers: [true]`` never drops attention
    layers (Minitron-SSM), ``[true, false]`` also tries candidates that may (MiniPuzzle 56B->47B)."""

    hidden_size: list[PositiveInt] = []
    intermediate_size: list[PositiveInt] = []
    num_attention_heads: list[PositiveInt] = []
    mamba_num_heads: list[PositiveInt] = []
    mamba_head_dim: list[PositiveInt] = []
    num_layers: list[PositiveInt] = []
    keep_attention_layers: list[bool] = [True]


class Budget(Section):
    """At least one constraint. Memory is weights + KV cache + Mamba state (model/cost.py)."""

    parameters: PositiveInt | None = None
    parameter_tolerance: float = Field(0.05, gt=0, lt=1)  # Minitron: within 5% of the target
    memory_gib: PositiveFloat | None = None
    context: PositiveInt = 8192
    batch: PositiveInt = 1
    dtype: Literal["float32", "bfloat16", "float16", "fp8", "fp4"] = "bfloat16"
    decode_latency_ms: PositiveFloat | None = None  # measured per token, at ``batch`` and ``latency_context``
    latency_context: PositiveInt = 256

    @model_validator(mode="after")
    def _some_constraint(self):
        if self.parameters is None and self.memory_gib is None and self.decode_latency_ms is None:
            raise field_error("parameters", "give at least one of parameters, memory_gib, decode_latency_ms")
        return self


class SearchSpec(Section):
    space: SearchSpace = Field(default_factory=SearchSpace)
    budget: Budget
    layer_metric: Literal["kl", "cosine"] = "kl"
    mamba_head_selection: Literal["group_aware", "global"] = "group_aware"
    max_candidates: PositiveInt = 32  # scored zero-shot; a seeded sample when more fit the budget
    zero_shot_sequences: PositiveInt = 64
    top_k: PositiveInt = 3
    short_kd: DistillSpec = Field(default_factory=lambda: DistillSpec(
        train=TrainSpec(steps=20, lr=1e-3, warmup_steps=2, checkpoint_every=10, eval_every=20)))
    tie_tolerance: float = Field(0.01, ge=0)  # nats of validation loss
    throughput_batch: PositiveInt = 1
    throughput_context: PositiveInt = 256
    seed: int = 0


class CompressSpec(Section):
    """``compress`` in a recipe: score the teacher once, then prune to a fixed ``target`` or
    ``search`` for the best architecture under a budget."""

    importance: ImportanceSpec = Field(default_factory=ImportanceSpec)
    target: PruneTarget | None = None
    search: SearchSpec | None = None

    @model_validator(mode="after")
    def _target_or_search(self):
        if (self.target is None) == (self.search is None):
            raise field_error("target", "give exactly one of compress.target and compress.search")
        return self
