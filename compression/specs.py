"""Recipe sections read by ``compression/``: what to score, what to prune to.

``PruneTarget`` names the sizes of the student; fields left out keep the teacher's size.
Whether a target fits a given teacher can only be checked against its config, so
``compression.prune.target_problems(config, target)`` does that before any work.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from model.specs import Section, field_error


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


class PruneSpec(Section):
    """``compress.prune`` in a recipe: a target and how to score the teacher."""

    target: PruneTarget = Field(default_factory=PruneTarget)
    importance: ImportanceSpec = Field(default_factory=ImportanceSpec)
