"""MiniPuzzle / Minitron-SSM architecture search under a budget.

    enumerate  every combination of the search space's choices (sizes, layers kept)
    filter     by the budget: parameters within a tolerance of a target, memory of weights +
               KV cache + Mamba state at a context length (model/cost.py), decode latency
               measured on the worker's device at the budget's batch and context
    score      prune each candidate from the saved importance scores (no recomputation) and
               rank by zero-shot validation loss: every candidate within the budget, in a
               fixed order (a space larger than ``max_candidates`` is an error, not a sample)
    retrain    the top k get a short distillation from the teacher (the paper: 3.8B tokens
               each for 22 candidates; rankings move during it, which is why this step exists),
               through ``short_kd``: in this process by default; the stage passes one that
               launches the distillation stage's own workers (torchrun, FSDP)
    choose     the lowest loss after the short KD; losses within ``tie_tolerance`` are tied
               and the tie goes to the higher measured decode throughput

The report (every candidate's architecture, parameters, memory, zero-shot loss, short-KD
loss, throughput, and the choice) is written as JSON, a markdown table and a Pareto plot.
The winner is then pruned afresh and fully distilled by the stages that follow.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from compression.distill import distill
from compression.importance import Scores
from compression.prune import droppable_layers, layer_count, make_plan, prune, pruned_config, target_problems
from compression.spec import PruneTarget, SearchSpec
from model.architectures import get_family
from model.cost import dtype_bytes, inference_memory
from model.data import PackedTokens
from model.digests import MEASUREMENTS_DIR
from model.train import evaluate_loss

SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "mamba_num_heads", "mamba_head_dim")


@dataclass
class Candidate:
    target: dict
    architecture: dict  # hidden, ffn, heads, layers, pattern
    parameters: int
    memory_bytes: float
    zero_shot_loss: float | None = None
    kd_loss: float | None = None
    decode_tokens_per_s: float | None = None
    decode_latency_ms: float | None = None
    chosen: bool = False
    notes: list[str] = field(default_factory=list)


def _choices(values: list, default) -> list:
    return values or [default]


def enumerate_candidates(config, scores: Scores, spec: SearchSpec) -> tuple[list[Candidate], dict]:
    """Every distinct architecture in the space that meets the parameter and memory budget."""
    family = get_family(config.model_type)
    space, budget = spec.space, spec.budget
    axes = [_choices(getattr(space, f), None) for f in SIZE_FIELDS]
    layer_counts = _choices(space.num_layers, None)
    seen, kept, rejected = set(), [], {"invalid": 0, "duplicate": 0, "parameters": 0, "memory": 0}
    for sizes, num_layers, keep_attention in itertools.product(itertools.product(*axes), layer_counts,
                                                               space.keep_attention_layers):
        target = PruneTarget(**dict(zip(SIZE_FIELDS, sizes, strict=True)),
                             drop_layers=_layers_to_drop(config, scores, num_layers, spec.layer_metric, keep_attention),
                             mamba_head_selection=spec.mamba_head_selection)
        if target_problems(config, target) or (target.drop_layers is not None
                                               and not _keeps_attention(config, target.drop_layers)):
            rejected["invalid"] += 1
            continue
        new_config = pruned_config(config, make_plan(config, scores, target))
        summary = family.summarize(new_config)
        signature = json.dumps({k: summary["config"][k] for k in sorted(summary["config"])}) + summary["layer_pattern"]
        if signature in seen:
            rejected["duplicate"] += 1
            continue
        seen.add(signature)
        parameters = summary["parameters"]
        if budget.parameters is not None and abs(parameters - budget.parameters) > budget.parameter_tolerance * budget.parameters:
            rejected["parameters"] += 1
            continue
        memory = _memory_bytes(new_config, parameters, budget)
        if budget.memory_gib is not None and memory > budget.memory_gib * 2**30:
            rejected["memory"] += 1
            continue
        kept.append(Candidate(target=target.model_dump(mode="json", exclude_none=True),
                              architecture=summary["config"] | {"layer_pattern": summary["layer_pattern"]},
                              parameters=parameters, memory_bytes=memory))
    return kept, rejected


def _memory_bytes(config, parameters: int, budget) -> float:
    """Inference memory of a candidate: model/cost.py, or for Hymba (windows, shared K/V, meta
    tokens: not modelled there) the weights plus its own cache formula, SSM state in float32."""
    if config.model_type == "hymba":
        from model.hymba import cache_bytes

        return (parameters * dtype_bytes(budget.dtype)
                + budget.batch * cache_bytes(config, budget.context, kv_bytes=dtype_bytes(budget.dtype), state_bytes=4))
    return inference_memory(config, parameters, budget.context, budget.batch, budget.dtype).total


def _layers_to_drop(config, scores: Scores, num_layers: int | None, metric: str, keep_attention: bool) -> list[int] | None:
    total = layer_count(config)
    if num_layers is None or num_layers >= total:
        return None
    droppable = set(droppable_layers(config, keep_attention))
    ranked = [i for i in scores[f"layer_{metric}"].argsort().tolist() if i in droppable]  # least important first
    drop = total - num_layers
    return sorted(ranked[:drop]) if len(ranked) >= drop else list(range(total))


def _keeps_attention(config, drop_layers: list[int]) -> bool:
    if config.model_type == "hymba":  # every Hymba layer has attention heads
        return True
    return any(t == "full_attention" for i, t in enumerate(config.layers_block_type) if i not in set(drop_layers))


def _decode_speed(model, batch: int, context: int) -> tuple[float, float]:
    """(decode tokens/s, ms per decode step) of ``model`` on its own device, after a ``context``-token prompt."""
    from model.efficiency import measure_point

    point = measure_point(model, batch, context, decode_tokens=8, warmup=1, repeats=2,
                          device=next(model.parameters()).device)
    return point["decode_tokens_per_s"], 1000 * point["decode_seconds"] / point["decode_tokens"]


# (pruned student, rank, description) -> (the student after its short distillation, that run's metrics)
ShortKD = Callable[[object, int, str], tuple[object, dict]]


def distill_in_process(teacher, train_data: PackedTokens, validation: PackedTokens, spec: SearchSpec,
                       work_dir: Path) -> ShortKD:
    """Short KD in this process, on the teacher's device (tests, one-device workers)."""
    def short_kd(student, rank: int, description: str):
        result = distill(student, teacher, train_data, spec.short_kd, Path(work_dir) / f"candidate-{rank}",
                         validation=validation, description=description)
        return student, {"steps": result["steps"], "tokens_seen": result["tokens_seen"]}

    return short_kd


def search(teacher, scores: Scores, train_data: PackedTokens, validation: PackedTokens, spec: SearchSpec,
           work_dir: Path, short_kd: ShortKD | None = None) -> dict:
    """Run the whole search; returns the report (candidates, rejections, the chosen target).

    Candidates are pruned onto the teacher's device and dtype and scored there."""
    candidates, rejected = enumerate_candidates(teacher.config, scores, spec)
    if not candidates:
        raise ValueError(f"no architecture in the search space meets the budget (rejected: {rejected}); "
                         "widen the space or loosen the budget")
    if len(candidates) > spec.max_candidates:
        raise ValueError(f"{len(candidates)} architectures in the search space meet the budget, more than "
                         f"search.max_candidates ({spec.max_candidates}); every one is scored, so narrow the space, "
                         "tighten the budget or raise max_candidates")
    short_kd = short_kd or distill_in_process(teacher, train_data, validation, spec, work_dir)
    rows = range(min(len(validation), spec.zero_shot_sequences))
    micro = spec.short_kd.train.micro_batch_size
    budget = spec.budget

    for candidate in candidates:
        student, _ = prune(teacher, scores, PruneTarget(**candidate.target))
        if budget.decode_latency_ms is not None:
            _, candidate.decode_latency_ms = _decode_speed(student, budget.batch, budget.latency_context)
            if candidate.decode_latency_ms > budget.decode_latency_ms:
                candidate.notes.append("over the latency budget")
                continue
        candidate.zero_shot_loss = evaluate_loss(student, validation, rows, micro)
        del student

    ranked = sorted((c for c in candidates if c.zero_shot_loss is not None), key=lambda c: c.zero_shot_loss)
    if not ranked:
        raise ValueError("every candidate is over the decode-latency budget")
    finalists = ranked[: spec.top_k]
    for rank, candidate in enumerate(finalists):
        # Not bound to a name here: short_kd may free the pruned copy while its distillation runs.
        student, result = short_kd(prune(teacher, scores, PruneTarget(**candidate.target))[0], rank,
                                   f"short KD {rank + 1}/{len(finalists)}")
        candidate.kd_loss = evaluate_loss(student, validation, rows, micro)
        candidate.decode_tokens_per_s, _ = _decode_speed(student, spec.throughput_batch, spec.throughput_context)
        candidate.notes.append(f"short KD: {result['steps']} steps, {result['tokens_seen']} tokens")
        del student

    best = min(c.kd_loss for c in finalists)
    tied = [c for c in finalists if c.kd_loss - best <= spec.tie_tolerance]
    winner = max(tied, key=lambda c: c.decode_tokens_per_s)
    winner.chosen = True
    if len(tied) > 1:
        winner.notes.append(f"tied with {len(tied) - 1} other(s) within {spec.tie_tolerance}; fastest decode wins")
    return {"teacher_parameters": sum(p.numel() for p in teacher.parameters()), "rejected": rejected,
            "budget": spec.budget.model_dump(mode="json"), "candidates": [asdict(c) for c in candidates],
            "chosen": asdict(winner)}

# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _fmt(value, spec: str = ".4f") -> str:
    return "" if value is None else format(value, spec)


def markdown_report(report: dict) -> str:
    from model.architectures import format_parameters

    lines = [
        "# Architecture search",
        "",
        f"Teacher: {format_parameters(report['teacher_parameters'])} parameters. "
        f"Budget: {json.dumps({k: v for k, v in report['budget'].items() if v is not None})}. "
        f"Rejected before scoring: {report['rejected']}.",
        "",
        "| | layers | hidden | FFN | attn heads | Mamba heads x dim | parameters | memory (GiB) | zero-shot loss "
        "| short-KD loss | decode tok/s | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_loss = sorted(report["candidates"], key=lambda c: (c["kd_loss"] is None, c["kd_loss"] or 0,
                                                           c["zero_shot_loss"] is None, c["zero_shot_loss"] or 0))
    for c in by_loss:
        a = c["architecture"]
        lines.append(
            f"| {'**chosen**' if c['chosen'] else ''} | {a['layer_pattern']} | {a['hidden_size']} | "
            f"{a['intermediate_size']} | {a['num_attention_heads']} | {a['mamba_num_heads']} x {a['mamba_head_dim']} | "
            f"{format_parameters(c['parameters'])} | {c['memory_bytes'] / 2**30:.3f} | {_fmt(c['zero_shot_loss'])} | "
            f"{_fmt(c['kd_loss'])} | {_fmt(c['decode_tokens_per_s'], '.1f')} | {'; '.join(c['notes'])} |")
    return "\n".join(lines) + "\n"


def pareto_plot(report: dict, path: Path) -> None:
    """Loss against parameters and against decode throughput; the chosen candidate marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    candidates = report["candidates"]
    fig, (by_size, by_speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    scored = [c for c in candidates if c["zero_shot_loss"] is not None]
    by_size.scatter([c["parameters"] / 1e6 for c in scored], [c["zero_shot_loss"] for c in scored],
                    label="zero-shot", color="tab:gray", alpha=0.6)
    kd = [c for c in candidates if c["kd_loss"] is not None]
    by_size.scatter([c["parameters"] / 1e6 for c in kd], [c["kd_loss"] for c in kd], label="after short KD",
                    color="tab:blue")
    by_speed.scatter([c["decode_tokens_per_s"] for c in kd], [c["kd_loss"] for c in kd], color="tab:blue",
                     label="after short KD")
    chosen = report["chosen"]
    for axis, x in ((by_size, chosen["parameters"] / 1e6), (by_speed, chosen["decode_tokens_per_s"])):
        axis.scatter([x], [chosen["kd_loss"]], marker="*", s=250, color="tab:red", label="chosen", zorder=3)
        axis.set_ylabel("validation loss")
        axis.grid(alpha=0.3)
        axis.legend()
    by_size.set_xlabel("parameters (M)")
    by_speed.set_xlabel("decode tokens/s")
    fig.suptitle("Architecture search: loss against size and speed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CHOICE_FILE = "choice.json"
REPORT_FILES = ("search.json", "search.md", "search_pareto.png")  # under measurements/


def write_report(report: dict, folder: Path) -> None:
    """``choice.json`` (the chosen target and architecture: what the prune stage takes) and, under
    ``measurements/``, the report of every candidate. Its measured decode speeds differ from one
    run to the next, so they stay outside the folder's digest (``model/digests.py``) and a search
    run again makes the same choice with the same digest."""
    measurements = folder / MEASUREMENTS_DIR
    measurements.mkdir(parents=True, exist_ok=True)
    chosen = report["chosen"]
    (folder / CHOICE_FILE).write_text(json.dumps({"target": chosen["target"],
                                                  "architecture": chosen["architecture"],
                                                  "parameters": chosen["parameters"]}, indent=1, sort_keys=True))
    json_file, markdown_file, plot_file = (measurements / name for name in REPORT_FILES)
    json_file.write_text(json.dumps(report, indent=1))
    markdown_file.write_text(markdown_report(report))
    pareto_plot(report, plot_file)
