"""Recipe sections read by ``compression/``: ``compress`` (importance, a target or a search)
and ``distill``.

``PruneTarget`` names the sizes of the student; fields left out keep the teacher's size.
Whether a target fits a given teacher can only be checked against its config, so
``compression.prune.target_problems(config, target)`` does that before any work.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from model.spec import Section, TrainSpec, field_error


class ImportanceSpec(Section):
    """One calibration pass with forward hooks (docs/compression.md, section 1.3).

    ``aggregation`` reduces activations (batch, seq, channel) to a score per channel:
    ``l2_mean`` (the papers' choice: mean |x| over the sequence, then L2 over the batch),
    ``mean_mean`` or ``variance`` (for ablations). ``method: random`` replaces every score
    with seeded noise, the baseline that importance must beat.
    """

    samples: PositiveInt = Field(
        64,
        description="Calibration sequences (whole rows of the training split) for the activation pass; at most "
                    "the number of rows there is (Minitron-SSM used 1024 sequences of 8192 tokens).",
    )
    batch_size: PositiveInt = Field(
        8, description="Sequences per forward pass, in the activation pass and in the layer-KL passes.",
    )
    aggregation: Literal["l2_mean", "mean_mean", "variance"] = Field(
        "l2_mean",
        description="How activations (batch, sequence, channel) become one score per channel: `l2_mean` (mean |x| "
                    "over the sequence, then L2 over the batch; the papers' choice), `mean_mean` (mean |x| over the "
                    "sequence, then mean over the batch) or `variance` (of x over every token); the last two are "
                    "for ablations.",
    )
    ffn_activation: Literal["pre", "post"] = Field(
        "pre",
        description="Where FFN neurons are scored: `pre` the output of up_proj, before the activation (the paper; "
                    "Hymba's SwiGLU: gate_proj, the activation's input); `post` the input of down_proj, after it "
                    "(NVIDIA's Model Optimizer).",
    )
    layer_samples: PositiveInt = Field(
        16,
        description="Sequences for the KL and MSE depth scores (the KL between the full model's next-token "
                    "distribution and that with one layer removed, and the mean squared error between their final "
                    "hidden states), both from the same passes; each batch costs num_layers + 1 forward passes.",
    )
    method: Literal["activation", "random"] = Field(
        "activation",
        description="`activation`: scores from the calibration passes; `random`: seeded noise in place of every "
                    "score, the baseline that importance must beat.",
    )
    seed: int = Field(
        0, description="Seeds which calibration sequences are drawn, and the noise of `method: random`.",
    )


class PruneTarget(Section):
    """The student's sizes. Omitted fields keep the teacher's value.

    Depth: ``num_layers`` keeps that many layers, dropping the least important by
    ``layer_metric``; or ``drop_layers`` lists layer indices to drop. Mamba heads are kept
    in equal numbers per group, each in its own group (``mamba_head_selection:
    group_aware``); ``global`` ranks heads across groups and packs the winners by
    position, the naive method the Minitron-SSM paper argues against (ablation only).

    Hymba (docs/compression.md 7): a query head and the SSM heads under its out_proj columns are
    pruned together, so the two head counts go together (an omitted one follows the other);
    depth pruning keeps every global-attention layer.
    """

    hidden_size: PositiveInt | None = Field(
        None,
        description="Embedding (hidden) channels to keep, the highest-scoring ones; null keeps the teacher's.",
    )
    intermediate_size: PositiveInt | None = Field(
        None, description="Neurons to keep in every FFN layer; null keeps the teacher's.",
    )
    num_attention_heads: PositiveInt | None = Field(
        None,
        description="Query heads to keep in every attention layer, chosen within each KV group, so a multiple of "
                    "the teacher's num_key_value_heads; null keeps the teacher's. Hymba: each goes with the SSM heads "
                    "under its out_proj columns (null follows mamba_num_heads).",
    )
    mamba_num_heads: PositiveInt | None = Field(
        None,
        description="Heads to keep in every Mamba layer, a multiple of the teacher's n_groups; null keeps the "
                    "teacher's. Hymba: num_attention_heads times 1 to r (r = v_head_dim / mamba_head_dim); null "
                    "follows num_attention_heads.",
    )
    mamba_head_dim: PositiveInt | None = Field(
        None,
        description="Channels to keep in every Mamba head (the same channel indices in every head); null keeps the "
                    "teacher's. Hymba: the value channels over the same out_proj columns go with them.",
    )
    num_layers: PositiveInt | None = Field(
        None,
        description="Keep this many layers, dropping the lowest-scoring by `layer_metric` (at least one attention "
                    "layer must remain; Hymba keeps every global-attention layer); null keeps every layer. Not with "
                    "`drop_layers`.",
    )
    drop_layers: list[int] | None = Field(
        None,
        description="0-based indices of the teacher's layers to drop, each at most once (at least one attention "
                    "layer must remain; never a Hymba global-attention layer); null drops none. Not with `num_layers`.",
    )
    layer_metric: Literal["kl", "cosine", "mse"] = Field(
        "kl",
        description="The depth score `num_layers` ranks layers by: `kl` (KL of the logits with the layer removed), "
                    "`cosine` (block importance, 1 - cos between a layer's input and output) or `mse` (mean squared "
                    "error of the final hidden states, after the final norm, with the layer removed; needs scores "
                    "from an importance run that saved `layer_mse`).",
    )
    mamba_head_selection: Literal["group_aware", "global"] = Field(
        "group_aware",
        description="`group_aware`: the same number of top heads in every group, each kept in its own group; "
                    "`global`: heads ranked across groups and the winners packed by position, the naive method the "
                    "Minitron-SSM paper argues against (ablation only).",
    )

    @model_validator(mode="after")
    def _one_depth_rule(self):
        if self.num_layers is not None and self.drop_layers is not None:
            raise field_error("drop_layers", "give num_layers or drop_layers, not both")
        if self.drop_layers is not None and len(set(self.drop_layers)) != len(self.drop_layers):
            raise field_error("drop_layers", f"lists a layer twice: {self.drop_layers}")
        return self


class DistillSpec(Section):
    """``distill`` in a recipe: retrain the pruned student on its teacher's logits.

    The loss per token is T^2 x KL(teacher || student) at temperature T, plus the optional
    cross-entropy and cosine terms. ``train`` is the loop's spec (steps, lr, batch, checkpoints).
    """

    train: TrainSpec = Field(
        default_factory=lambda: TrainSpec(steps=100, lr=1e-3, warmup_steps=10),
        description="The training loop the student is distilled with (steps, lr, batches, checkpoints, processes); "
                    "by default 100 steps at lr 1e-3 with 10 warmup steps (20 and 2 in `search.short_kd`).",
    )
    temperature: PositiveFloat = Field(
        1.0,
        description="Softmax temperature T of teacher and student logits; the KL is scaled by T^2, so 1 is the "
                    "plain forward KL(teacher || student).",
    )
    ce_weight: float = Field(
        0.0, ge=0, description="Weight of an added next-token cross-entropy term on the data; 0 is pure distillation.",
    )
    top_k: PositiveInt | None = Field(
        None,
        description="Keep only the teacher's k largest logits, renormalized over them; the student's "
                    "log-probabilities stay over the full vocabulary, so its mass outside those k ids is penalized. "
                    "Null uses the whole vocabulary; at least 2.",
    )
    top_k_student: Literal["full", "renormalized"] = Field(
        "full",
        description="With `top_k`: `full` reads the student's log-probabilities at the teacher's k ids from its "
                    "distribution over the whole vocabulary (mass elsewhere is penalized); `renormalized` compares "
                    "both distributions over those k ids only.",
    )
    cosine_weight: float = Field(
        0.0, ge=0,
        description="Weight of an added 1 - cos term between each student block's output and that of the teacher "
                    "block it was cut from (from the student's pruning.json); 0 disables it. When the hidden size "
                    "was pruned, the teacher's outputs are read on the channels the student kept.",
    )

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

    hidden_size: list[PositiveInt] = Field([], description="Hidden sizes to try; empty keeps the teacher's.")
    intermediate_size: list[PositiveInt] = Field([], description="FFN sizes to try; empty keeps the teacher's.")
    num_attention_heads: list[PositiveInt] = Field(
        [],
        description="Attention query-head counts to try; empty keeps the teacher's. A count that is not a multiple "
                    "of the teacher's num_key_value_heads makes an invalid candidate, which is skipped.",
    )
    mamba_num_heads: list[PositiveInt] = Field(
        [],
        description="Mamba head counts to try; empty keeps the teacher's. A count that is not a multiple of the "
                    "teacher's n_groups makes an invalid candidate, which is skipped.",
    )
    mamba_head_dim: list[PositiveInt] = Field(
        [], description="Channels per Mamba head to try; empty keeps the teacher's.",
    )
    num_layers: list[PositiveInt] = Field(
        [],
        description="Layer counts to try, each keeping that many layers and dropping the lowest-scoring by "
                    "`search.layer_metric`; empty keeps every layer.",
    )
    keep_attention_layers: list[bool] = Field(
        [True],
        description="`true`: depth pruning never drops an attention layer (Minitron-SSM); `false`: it may, as long "
                    "as one remains (MiniPuzzle 56B->47B). `[true, false]` tries both.",
    )


MemoryDtype = Literal["float32", "bfloat16", "float16", "fp8", "fp4"]  # model/cost.py's DTYPE_BYTES


class Budget(Section):
    """The search's budget: candidates outside it are rejected before they are scored.

    At least one constraint. Memory is weights + KV cache + Mamba state (model/cost.py)."""

    parameters: PositiveInt | None = Field(
        None,
        description="Target parameter count: a candidate must be within `parameter_tolerance` of it, above or "
                    "below; null: no parameter constraint.",
    )
    parameter_tolerance: float = Field(
        0.05, gt=0, lt=1,
        description="Allowed relative distance from `parameters`: 0.05 is within 5% of the target (Minitron's "
                    "choice).",
    )
    memory_gib: PositiveFloat | None = Field(
        None,
        description="Most inference memory a candidate may need, in GiB: weights + KV cache + Mamba state for "
                    "`batch` sequences of `context` tokens in `dtype`; null: no memory constraint.",
    )
    context: PositiveInt = Field(8192, description="Context length, in tokens, of the memory budget.")
    batch: PositiveInt = Field(
        1, description="Sequences served at once, in the memory budget and the decode-latency measurement.",
    )
    dtype: MemoryDtype = Field(
        "bfloat16",
        description="Number format of the memory budget's weights, KV cache and conv state (4, 2, 2, 1 and 0.5 "
                    "bytes per value) unless a component's own dtype below is given; the Mamba SSM state counts in "
                    "the model's mamba_ssm_cache_dtype (float32 by default) unless `mamba_state_dtype` is given.",
    )
    weights_dtype: MemoryDtype | None = Field(
        None, description="Number format of the weights in the memory budget; null: `dtype`.",
    )
    kv_cache_dtype: MemoryDtype | None = Field(
        None,
        description="Number format of the attention KV cache in the memory budget; null: `dtype`. FP4 weights "
                    "with a bfloat16 or FP8 cache are different budgets.",
    )
    mamba_state_dtype: MemoryDtype | None = Field(
        None,
        description="Number format of the whole Mamba state (conv and SSM states) in the memory budget; null: the "
                    "conv state in `dtype` and the SSM state in the model's mamba_ssm_cache_dtype.",
    )
    decode_latency_ms: PositiveFloat | None = Field(
        None,
        description="Most milliseconds a candidate may take per decode step (one token for each of `batch` "
                    "sequences after a `latency_context`-token prompt), measured on the pruned model on the "
                    "worker's device in its inference dtype; null: no latency constraint.",
    )
    latency_context: PositiveInt = Field(
        256, description="Prompt length, in tokens, before the decode steps that `decode_latency_ms` times.",
    )

    @model_validator(mode="after")
    def _some_constraint(self):
        if self.parameters is None and self.memory_gib is None and self.decode_latency_ms is None:
            raise field_error("parameters", "give at least one of parameters, memory_gib, decode_latency_ms")
        return self


class SearchSpec(Section):
    """``compress.search``: every combination of ``space`` that meets ``budget`` is pruned from the
    saved importance scores and ranked zero-shot on validation data (by ``ranking``: loss, next-token
    accuracy or greedy agreement with the teacher); the best ``top_k`` (and optionally a
    ``diverse_finalist``) get a short distillation, and the lowest loss after it wins (ties within
    ``tie_tolerance`` go to the faster decoder). docs/compression.md, sections 1.5 and 2.3."""

    space: SearchSpace = Field(
        default_factory=SearchSpace, description="The choices per axis; every combination is a candidate.",
    )
    budget: Budget = Field(description="Required: the constraints a candidate must meet.")
    layer_metric: Literal["kl", "cosine", "mse"] = Field(
        "kl",
        description="The depth score that decides which layers a `space.num_layers` choice drops: `kl` (KL of the "
                    "logits with the layer removed), `cosine` (block importance) or `mse` (mean squared error of the "
                    "final hidden states with the layer removed). All three come from the saved importance scores; "
                    "`mse` needs scores saved since it was added (rerun the importance stage for older ones).",
    )
    mamba_head_selection: Literal["group_aware", "global"] = Field(
        "group_aware",
        description="How every candidate keeps Mamba heads: `group_aware` (the same number per group, each in its "
                    "own group) or `global` (ranked across groups; ablation only).",
    )
    max_candidates: PositiveInt = Field(
        256,
        description="A ceiling on the search's size: every candidate that meets the budget is scored zero-shot, "
                    "and a space that admits more than this many is an error before any scoring (never a sample).",
    )
    zero_shot_sequences: PositiveInt = Field(
        64,
        description="Validation rows (the first N) on which each candidate's loss is measured, zero-shot and "
                    "after its short distillation.",
    )
    ranking: Literal["lm_loss", "token_accuracy", "greedy_agreement"] = Field(
        "lm_loss",
        description="The zero-shot score that ranks the candidates, all three measured in the same forward pass "
                    "and reported: `lm_loss` (validation next-token loss, lower is better), `token_accuracy` (the "
                    "fraction of validation tokens that are the candidate's argmax prediction) or "
                    "`greedy_agreement` (the fraction of positions where the candidate's argmax equals the "
                    "teacher's on the same inputs); higher is better for both. The choice after the short "
                    "distillation stays by loss.",
    )
    top_k: PositiveInt = Field(
        3,
        description="Candidates ranked best zero-shot (by `ranking`) that get the short distillation; the winner is "
                    "one of the finalists.",
    )
    diverse_finalist: bool = Field(
        False,
        description="Add one finalist beyond `top_k`: among the rest, the one whose shape differs most from the top "
                    "k (its smallest distance to any of them, the L1 distance over hidden_size, intermediate_size, "
                    "num_attention_heads, mamba_num_heads, mamba_head_dim and the number of layers, each divided by "
                    "the teacher's value), the better-ranked on a tie; none when every remaining shape is in the top "
                    "k.",
    )
    short_kd: DistillSpec = Field(
        default_factory=lambda: DistillSpec(
            train=TrainSpec(steps=20, lr=1e-3, warmup_steps=2, checkpoint_every=10, eval_every=20)),
        description="The distillation each of the `top_k` candidates gets before the choice (by default 20 steps "
                    "at lr 1e-3); its `cosine_weight` must stay 0.",
    )
    tie_tolerance: float = Field(
        0.01, ge=0,
        description="Validation losses after the short distillation within this many nats of the best are tied; "
                    "the tie goes to the highest measured decode throughput.",
    )
    throughput_batch: PositiveInt = Field(
        1, description="Batch size at which the finalists' decode throughput (the tie-break) is measured.",
    )
    throughput_context: PositiveInt = Field(
        256,
        description="Prompt length, in tokens, prefilled before the timed decode steps of that measurement.",
    )


class CompressSpec(Section):
    """``compress`` in a recipe: score the teacher once, then prune to a fixed ``target`` or
    ``search`` for the best architecture under a budget."""

    importance: ImportanceSpec = Field(
        default_factory=ImportanceSpec,
        description="The calibration pass that scores every width axis and layer of the teacher, computed once and "
                    "reused by the target or every search candidate.",
    )
    target: PruneTarget | None = Field(
        None, description="Fixed student sizes to prune to; give this or `search`, not both.",
    )
    search: SearchSpec | None = Field(
        None, description="A search for the best student under a budget, in place of a fixed `target`.",
    )

    @model_validator(mode="after")
    def _target_or_search(self):
        if (self.target is None) == (self.search is None):
            raise field_error("target", "give exactly one of compress.target and compress.search")
        return self
