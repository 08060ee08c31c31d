"""MiniPuzzle / Minitron-SSM architecture search under a budget.

    enumerate  every combination of the search space's choices (sizes, layers kept)
    filter     by the budget: parameters within a tolerance of a target, memory of weights +
               KV cache + Mamba state at a context length (model/cost.py; each part in its own
               dtype), decode latency measured on the worker's device at the budget's batch
               and context
    score      prune each candidate from the saved importance scores (no recomputation) and
               measure, in one forward pass over the validation rows, its loss, next-token
               accuracy and greedy agreement with the teacher (whose argmax tokens are computed
               once); rank by ``spec.ranking``: every candidate within the budget, in a fixed
               order (a space larger than ``max_candidates`` is an error, not a sample)
    retrain    the finalists (the top k, and with ``diverse_finalist`` the remaining candidate
               whose shape differs most from them) get a short distillation from the teacher (the
               paper: 3.8B tokens each for 22 candidates; rankings move during it, which is why
               this step exists), through ``short_kd``: in this process by default; the stage
               passes one that launches the distillation stage's own workers (torchrun, FSDP)
    choose     the lowest loss after the short KD; losses within ``tie_tolerance`` are tied
               and the tie goes to the higher measured decode throughput. The choice stays by
               loss whatever the ranking: the short KD minimizes a loss and ``tie_tolerance``
               is in nats; the other two metrics after it are reported.

The report (every candidate's architecture, parameters, memory by component, the three
zero-shot metrics and its rank, the same after the short KD, throughput, and the choice) is
written as JSON, a markdown table and a Pareto plot.
The winner is then pruned afresh and fully distilled by the stages that follow.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from compression.distill import distill
from compression.importance import Scores, layer_score
from compression.prune import droppable_layers, layer_count, make_plan, prune, pruned_config, target_problems
from compression.spec import PruneTarget, SearchSpec
from model.architectures import get_family
from model.cost import InferenceMemory, dtype_bytes, inference_memory
from model.data import PackedTokens
from model.device import autocast, training_precision
from model.digests import MEASUREMENTS_DIR
from model.losses import CHUNK_TOKENS, final_hidden, project

SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "mamba_num_heads", "mamba_head_dim")
# The architecture fields of the diverse finalist's shape distance (``shape_distance``).
SHAPE_FIELDS = (*SIZE_FIELDS, "num_layers")
# ranking -> (the Candidate field it reads, higher is better)
RANKINGS = {"lm_loss": ("zero_shot_loss", False), "token_accuracy": ("zero_shot_token_accuracy", True),
            "greedy_agreement": ("zero_shot_greedy_agreement", True)}


@dataclass
class Candidate:
    target: dict
    architecture: dict  # hidden, ffn, heads, layers, pattern
    parameters: int
    memory_bytes: float
    memory: dict = field(default_factory=dict)  # bytes by component: weights, kv_cache, conv_state, ssm_state
    zero_shot_loss: float | None = None
    zero_shot_token_accuracy: float | None = None
    zero_shot_greedy_agreement: float | None = None
    rank: int | None = None  # 1-based zero-shot rank by spec.ranking
    finalist: str | None = None  # "top_k" or "diverse"
    kd_loss: float | None = None
    kd_token_accuracy: float | None = None
    kd_greedy_agreement: float | None = None
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
        memory = budget_memory(new_config, parameters, budget)
        if budget.memory_gib is not None and memory.total > budget.memory_gib * 2**30:
            rejected["memory"] += 1
            continue
        kept.append(Candidate(target=target.model_dump(mode="json", exclude_none=True),
                              architecture=summary["config"] | {"layer_pattern": summary["layer_pattern"]},
                              parameters=parameters, memory_bytes=memory.total, memory=asdict(memory)))
    return kept, rejected


def budget_memory(config, parameters: int, budget) -> InferenceMemory:
    """Inference memory of a candidate, each component in the budget's dtype for it (``weights_dtype``,
    ``kv_cache_dtype``, ``mamba_state_dtype``; null: ``dtype``, the SSM state the model's own):
    model/cost.py, or for Hymba (windows, shared K/V, meta tokens: not modelled there) the weights
    plus its own cache formula, SSM state in float32 unless ``mamba_state_dtype`` says otherwise."""
    kv_dtype = budget.kv_cache_dtype or budget.dtype
    conv_dtype = budget.mamba_state_dtype or budget.dtype
    if config.model_type == "hymba":
        from model.hymba import cache_bytes

        def part(kv=0.0, conv=0.0, state=0.0):  # cache_bytes is linear in each width
            return budget.batch * cache_bytes(config, budget.context, kv_bytes=kv, conv_bytes=conv, state_bytes=state)

        ssm = dtype_bytes(budget.mamba_state_dtype) if budget.mamba_state_dtype else 4.0
        weights = parameters * dtype_bytes(budget.weights_dtype or budget.dtype)
        return InferenceMemory(weights=weights, kv_cache=part(kv=dtype_bytes(kv_dtype)),
                               conv_state=part(conv=dtype_bytes(conv_dtype)), ssm_state=part(state=ssm))
    return inference_memory(config, parameters, budget.context, budget.batch, budget.dtype,
                            ssm_dtype=budget.mamba_state_dtype, weights_dtype=budget.weights_dtype,
                            kv_cache_dtype=kv_dtype, conv_dtype=conv_dtype)


def _layers_to_drop(config, scores: Scores, num_layers: int | None, metric: str, keep_attention: bool) -> list[int] | None:
    total = layer_count(config)
    if num_layers is None or num_layers >= total:
        return None
    droppable = set(droppable_layers(config, keep_attention))
    ranked = [i for i in layer_score(scores, metric).argsort().tolist() if i in droppable]  # least important first
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


# --------------------------------------------------------------------------------------
# Zero-shot metrics and finalists
# --------------------------------------------------------------------------------------


def token_metric_sums(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                      reference: torch.Tensor | None = None) -> torch.Tensor:
    """Sums over the masked positions of (n, V) logits: [cross entropy, argmax == target, argmax ==
    ``reference`` (the teacher's argmax; 0 without one), positions]. ``metrics_from_sums`` divides."""
    mask = mask.bool()
    predicted = logits.argmax(-1)
    loss = F.cross_entropy(logits.float(), targets, reduction="none")
    agree = (predicted == reference) if reference is not None else torch.zeros_like(mask)
    return torch.stack([loss[mask].double().sum(), (predicted == targets)[mask].double().sum(),
                        agree[mask].double().sum(), mask.double().sum()])


def metrics_from_sums(sums: torch.Tensor, with_agreement: bool = True) -> dict:
    """{lm_loss, token_accuracy, greedy_agreement} (per position) from ``token_metric_sums`` totals."""
    loss, correct, agree, count = (sums / sums[3]).tolist()
    return {"lm_loss": loss, "token_accuracy": correct, "greedy_agreement": agree if with_agreement else None}


@torch.no_grad()
def zero_shot_metrics(model, data: PackedTokens, rows: Sequence[int], micro_batch_size: int,
                      reference: list[torch.Tensor] | None = None, keep_argmax: bool = False,
                      chunk_tokens: int = CHUNK_TOKENS) -> tuple[dict, list[torch.Tensor] | None]:
    """``model``'s loss, next-token accuracy and agreement with ``reference`` (the teacher's argmax
    per micro-batch, from this function's ``keep_argmax``) over ``rows``, from one forward per
    micro-batch and ``chunk_tokens`` positions of logits at a time (model/losses.py). The loss is
    ``evaluate_loss``'s, at the same precision. Returns (metrics, the argmax per micro-batch or None)."""
    device = next(model.parameters()).device
    precision = training_precision("auto", device)
    was_training = model.training
    model.eval()
    rows, kept, sums = list(rows), [], torch.zeros(4, dtype=torch.float64, device=device)
    for batch_index, start in enumerate(range(0, len(rows), micro_batch_size)):
        input_ids, valid = data.batch(rows[start : start + micro_batch_size])
        input_ids, mask = input_ids.to(device), valid[:, 1:].to(device).flatten()
        with autocast(device, precision):
            hidden, head = final_hidden(model, input_ids)
            hidden, targets = hidden[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten()
            teacher = reference[batch_index] if reference is not None else None
            argmax = []
            for at in range(0, targets.shape[0], chunk_tokens):
                span = slice(at, at + chunk_tokens)
                logits = project(head, hidden[span])
                sums += token_metric_sums(logits, targets[span], mask[span],
                                          teacher[span] if teacher is not None else None)
                if keep_argmax:
                    argmax.append(logits.argmax(-1))
        if keep_argmax:
            kept.append(torch.cat(argmax))
    model.train(was_training)
    return metrics_from_sums(sums, reference is not None), kept if keep_argmax else None


def rank_candidates(candidates: list[Candidate], ranking: str) -> list[Candidate]:
    """The scored candidates, best first by ``ranking`` (ties: lower loss, then enumeration order)."""
    name, higher_is_better = RANKINGS[ranking]
    scored = [c for c in candidates if getattr(c, name) is not None]
    return sorted(scored, key=lambda c: ((-1 if higher_is_better else 1) * getattr(c, name), c.zero_shot_loss))


def shape_of(architecture: dict) -> dict:
    """The ``SHAPE_FIELDS`` of an architecture (a candidate's, or a family's ``summarize()['config']``
    with its ``layer_pattern``); fields the family lacks are left out."""
    layers = architecture.get("num_hidden_layers") or len(architecture.get("layer_pattern") or "") or None
    shape = {f: architecture.get(f) for f in SIZE_FIELDS} | {"num_layers": layers}
    return {f: v for f, v in shape.items() if v is not None}


def shape_distance(a: dict, b: dict, scale: dict) -> float:
    """Normalized L1 distance of two shapes: sum over ``SHAPE_FIELDS`` of |a - b| / scale (the teacher's
    value of the field), so halving the hidden size counts as much as halving the layers."""
    return sum(abs(a[f] - b[f]) / scale[f] for f in SHAPE_FIELDS if f in a and f in b and scale.get(f))


def choose_finalists(ranked: list[Candidate], top_k: int, diverse: bool, scale: dict) -> list[Candidate]:
    """The best ``top_k`` of ``ranked`` and, with ``diverse``, the remaining candidate farthest from all of
    them (the largest smallest ``shape_distance`` to one of them; the better-ranked on a tie), unless
    every remaining shape is one of theirs (distance 0)."""
    finalists = ranked[:top_k]
    for candidate in finalists:
        candidate.finalist = "top_k"
    rest = ranked[top_k:]
    if diverse and rest:
        shapes = [shape_of(c.architecture) for c in finalists]

        def distance(c):
            shape = shape_of(c.architecture)
            return min(shape_distance(shape, other, scale) for other in shapes)

        farthest = max(rest, key=distance)  # max keeps the first (best-ranked) of equal distances
        if distance(farthest) > 0:
            farthest.finalist = "diverse"
            farthest.notes.append(f"diverse finalist: shape distance {distance(farthest):.3f} from the top {top_k}")
            finalists = [*finalists, farthest]
    return finalists


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
    # The teacher's greedy tokens, once: every candidate's agreement is measured against them.
    teacher_metrics, greedy = zero_shot_metrics(teacher, validation, rows, micro, keep_argmax=True)

    for candidate in candidates:
        student, _ = prune(teacher, scores, PruneTarget(**candidate.target))
        if budget.decode_latency_ms is not None:
            _, candidate.decode_latency_ms = _decode_speed(student, budget.batch, budget.latency_context)
            if candidate.decode_latency_ms > budget.decode_latency_ms:
                candidate.notes.append("over the latency budget")
                continue
        metrics, _ = zero_shot_metrics(student, validation, rows, micro, reference=greedy)
        candidate.zero_shot_loss = metrics["lm_loss"]
        candidate.zero_shot_token_accuracy = metrics["token_accuracy"]
        candidate.zero_shot_greedy_agreement = metrics["greedy_agreement"]
        del student

    ranked = rank_candidates(candidates, spec.ranking)
    if not ranked:
        raise ValueError("every candidate is over the decode-latency budget")
    for rank, candidate in enumerate(ranked):
        candidate.rank = rank + 1
    finalists = choose_finalists(ranked, spec.top_k, spec.diverse_finalist,
                                 shape_of(_architecture(teacher.config)))
    for rank, candidate in enumerate(finalists):
        # Not bound to a name here: short_kd may free the pruned copy while its distillation runs.
        student, result = short_kd(prune(teacher, scores, PruneTarget(**candidate.target))[0], rank,
                                   f"short KD {rank + 1}/{len(finalists)}")
        metrics, _ = zero_shot_metrics(student, validation, rows, micro, reference=greedy)
        candidate.kd_loss = metrics["lm_loss"]
        candidate.kd_token_accuracy = metrics["token_accuracy"]
        candidate.kd_greedy_agreement = metrics["greedy_agreement"]
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
            "budget": spec.budget.model_dump(mode="json"), "ranking": spec.ranking,
            "teacher_metrics": {k: v for k, v in teacher_metrics.items() if v is not None},
            "candidates": [asdict(c) for c in candidates], "chosen": asdict(winner)}


def _architecture(config) -> dict:
    summary = get_family(config.model_type).summarize(config)
    return summary["config"] | {"layer_pattern": summary["layer_pattern"]}

# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _fmt(value, spec: str = ".4f") -> str:
    return "" if value is None else format(value, spec)


def _gib(candidate: dict, part: str) -> str:
    value = (candidate.get("memory") or {}).get(part)
    return "" if value is None else f"{value / 2**30:.3f}"


def markdown_report(report: dict) -> str:
    from model.architectures import format_parameters

    ranking = report.get("ranking", "lm_loss")
    lines = [
        "# Architecture search",
        "",
        f"Teacher: {format_parameters(report['teacher_parameters'])} parameters. "
        f"Budget: {json.dumps({k: v for k, v in report['budget'].items() if v is not None})}. "
        f"Rejected before scoring: {report['rejected']}. Ranked zero-shot by `{ranking}`; "
        "acc: next-token accuracy, agree: greedy agreement with the teacher; the choice is by short-KD loss.",
        "",
        "| | rank | layers | hidden | FFN | attn heads | Mamba heads x dim | parameters | memory (GiB) "
        "| weights / KV / conv / SSM (GiB) | zero-shot loss | acc | agree | short-KD loss | acc | agree "
        "| decode tok/s | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_loss = sorted(report["candidates"], key=lambda c: (c["kd_loss"] is None, c["kd_loss"] or 0,
                                                           c.get("rank") is None, c.get("rank") or 0))
    for c in by_loss:
        a = c["architecture"]
        parts = " / ".join(_gib(c, p) for p in ("weights", "kv_cache", "conv_state", "ssm_state")) \
            if c.get("memory") else ""
        lines.append(
            f"| {'**chosen**' if c['chosen'] else ''} | {c.get('rank') or ''} | {a['layer_pattern']} | "
            f"{a['hidden_size']} | {a['intermediate_size']} | {a['num_attention_heads']} | "
            f"{a['mamba_num_heads']} x {a['mamba_head_dim']} | {format_parameters(c['parameters'])} | "
            f"{c['memory_bytes'] / 2**30:.3f} | {parts} | {_fmt(c['zero_shot_loss'])} | "
            f"{_fmt(c.get('zero_shot_token_accuracy'))} | {_fmt(c.get('zero_shot_greedy_agreement'))} | "
            f"{_fmt(c['kd_loss'])} | {_fmt(c.get('kd_token_accuracy'))} | {_fmt(c.get('kd_greedy_agreement'))} | "
            f"{_fmt(c['decode_tokens_per_s'], '.1f')} | {'; '.join(c['notes'])} |")
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
