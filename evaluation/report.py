"""Reports people can read: ``metrics.json``, ``report.md`` and PNG charts.

    metrics.json   every number of every model (the nested results, headline scalars,
                   ratios to the teacher, gate checks)
    report.md      tables of the same, with the charts inline
    plots/loss_curves.png  training / KD loss of every model that has a training history (measurements/)
    plots/recall.png       MQAR accuracy against sequence length, passkey against context length
    plots/pareto.png       validation loss against parameters and against decode tokens/s,
                           the teacher and every student on one chart

Each ``plot_*`` function returns its matplotlib Figure (tests read the plotted series from
it); ``write_report`` saves them. matplotlib runs on its Agg backend: no display needed.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from evaluation.gate import GateResult, headline, point_key, relative_to_teacher  # noqa: E402
from model.architectures import format_parameters  # noqa: E402
from model.fsutil import atomic_write_text  # noqa: E402

PLOTS_DIR = "plots"


def _marker(label: str, teacher: str | None) -> dict:
    return {"marker": "*", "markersize": 14} if label == teacher else {"marker": "o", "markersize": 7}


def plot_loss_curves(histories: dict[str, list[dict]]) -> Figure | None:
    """Training loss per step for each model (pretraining for a teacher, KD for a student),
    with validation loss as markers where it was measured."""
    histories = {label: h for label, h in histories.items() if h}
    if not histories:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, history in histories.items():
        line = ax.plot([r["step"] for r in history], [r["loss"] for r in history], label=f"{label} train")[0]
        val = [r for r in history if "val_loss" in r]
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], linestyle="none", marker="o",
                    color=line.get_color(), label=f"{label} validation")
    ax.set(xlabel="optimizer step", ylabel="loss (nats/token)", title="Training and KD loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_recall(results: dict[str, dict]) -> Figure | None:
    """MQAR accuracy (mean over key-value counts) vs sequence length; passkey accuracy vs context
    length. One panel per test that has data; one line per model."""
    series: dict[str, dict[str, tuple[list, list]]] = {"mqar": {}, "passkey": {}}
    chance = {}
    for label, result in results.items():
        recall = result.get("recall") or {}
        by_length: dict[int, list[float]] = {}
        for row in recall.get("mqar", []):
            by_length.setdefault(row["seq_len"], []).append(row["accuracy"])
            chance["mqar"] = row["chance"]
        if by_length:
            xs = sorted(by_length)
            series["mqar"][label] = (xs, [statistics.fmean(by_length[n]) for n in xs])
        rows = sorted(recall.get("passkey", []), key=lambda r: r["context_length"])
        if rows:
            series["passkey"][label] = ([r["context_length"] for r in rows], [r["accuracy"] for r in rows])
            chance["passkey"] = rows[0]["chance"]
    panels = [(name, title, xlabel) for name, title, xlabel in (
        ("mqar", "MQAR (mean over key-value pairs)", "sequence length (tokens)"),
        ("passkey", "Passkey retrieval", "context length (tokens)")) if series[name]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (name, title, xlabel) in zip(axes[0], panels, strict=True):
        for label, (xs, ys) in series[name].items():
            ax.plot(xs, ys, marker="o", label=label)
        ax.axhline(chance[name], color="grey", linestyle=":", label="chance")
        lengths = sorted({x for xs, _ in series[name].values() for x in xs})
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set(title=title, xlabel=xlabel, ylabel="accuracy", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def throughput_point(results: dict[str, dict]) -> str | None:
    """The (batch, context) point the Pareto chart uses: the largest batch and context every model has."""
    sets = [{point_key(p): (p["batch_size"], p["context_length"]) for p in r.get("efficiency", {}).get("points", [])}
            for r in results.values()]
    sets = [s for s in sets if s]
    if not sets:
        return None
    shared = set.intersection(*(set(s) for s in sets))
    return max(shared, key=lambda k: sets[0][k]) if shared else None


def plot_pareto(results: dict[str, dict], teacher: str | None = None) -> Figure | None:
    """Validation loss against parameters and against decode tokens/s, one marker per model."""
    scalars = {label: headline(r) for label, r in results.items()}
    scalars = {label: s for label, s in scalars.items() if "val_loss" in s}
    if not scalars:
        return None
    point = throughput_point({label: results[label] for label in scalars})
    fig, axes = plt.subplots(1, 2 if point else 1, figsize=(11 if point else 5.5, 4.2), squeeze=False)
    panels = [("parameters", "parameters", lambda v: format_parameters(int(v)))]
    if point:
        panels.append((f"decode_tokens_per_s@{point}", f"decode tokens/s ({point.replace('_', ', ')})", lambda v: f"{v:.0f}"))
    for ax, (key, xlabel, fmt), better in zip(axes[0], panels, ("lower", "higher"), strict=False):
        placed = {label: (s[key], s["val_loss"]) for label, s in scalars.items() if key in s}
        for label, (x, y) in placed.items():
            ax.plot([x], [y], linestyle="none", label=label, **_marker(label, teacher))
            ax.annotate(f"{label}\n{fmt(x)}", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7)
        frontier = pareto_frontier(list(placed.values()), x_better=better)
        if len(frontier) > 1:
            ax.plot(*zip(*frontier, strict=True), linestyle="--", color="grey", linewidth=1, label="Pareto frontier")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _, fmt=fmt: fmt(v)))
        ax.set(xlabel=xlabel, ylabel="validation loss (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_title("Quality vs size")
    if point:
        axes[0][1].set_title("Quality vs decode throughput")
    fig.tight_layout()
    return fig


def pareto_frontier(points: list[tuple[float, float]], x_better: str = "lower") -> list[tuple[float, float]]:
    """The points no other point beats on both axes (y: lower is better; x: ``x_better``), sorted by x."""
    sign = 1 if x_better == "lower" else -1
    frontier, best_y = [], float("inf")
    for x, y in sorted(points, key=lambda p: (sign * p[0], p[1])):
        if y < best_y:
            frontier.append((x, y))
            best_y = y
    return sorted(frontier)


def save_figure(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------
# JSON and markdown
# --------------------------------------------------------------------------------------


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows), ""]


def render_markdown(summary: dict) -> str:
    models, teacher = summary["models"], summary.get("teacher")
    lines = ["# Evaluation report", ""]
    if teacher:
        lines += [f"Teacher: **{teacher}**. Ratios are candidate / teacher at the same (batch, context) point.", ""]
    rows = []
    for label, m in models.items():
        h, r = m["headline"], m.get("relative_to_teacher", {})
        gate = summary["gates"].get(label)
        rows.append([label, format_parameters(int(h.get("parameters", 0))), h.get("val_loss"), h.get("val_perplexity"),
                     h.get("kl_to_teacher"), h.get("greedy_agreement"), h.get("mqar_accuracy"), h.get("passkey_accuracy"),
                     r.get("val_loss_ratio"), r.get("decode_speedup"), r.get("prefill_speedup"), r.get("cache_bytes_ratio"),
                     "-" if gate is None else ("pass" if gate["passed"] else "FAIL")])
    lines += ["## Overview", ""]
    lines += _table(["model", "params", "val loss", "ppl", "KL to teacher", "greedy agreement", "MQAR", "passkey",
                     "loss ratio", "decode speedup", "prefill speedup", "cache ratio", "gate"], rows)

    task_rows = [[label, task, metric, value] for label, m in models.items()
                 for task, metrics in m["result"].get("tasks", {}).items()
                 for metric, value in metrics.items() if not metric.endswith("_stderr")]
    if task_rows:
        lines += ["## Benchmarks (lm-evaluation-harness, `hf` model)", ""]
        lines += _table(["model", "task", "metric", "value"], task_rows)

    mqar_rows = [[label, row["seq_len"], row["num_kv_pairs"], row["accuracy"], row["chance"]]
                 for label, m in models.items() for row in m["result"].get("recall", {}).get("mqar", [])]
    passkey_rows = [[label, row["context_length"], row["accuracy"], row["trials"]]
                    for label, m in models.items() for row in m["result"].get("recall", {}).get("passkey", [])]
    if mqar_rows or passkey_rows:
        lines += ["## Recall", ""]
        if mqar_rows:
            lines += ["MQAR accuracy by sequence length and number of key-value pairs:", ""]
            lines += _table(["model", "seq len", "kv pairs", "accuracy", "chance"], mqar_rows)
        if passkey_rows:
            lines += _table(["model", "context", "passkey accuracy", "trials"], passkey_rows)

    eff_rows, where = [], set()
    for label, m in models.items():
        eff = m["result"].get("efficiency")
        if not eff:
            continue
        where.add(f"{eff['device']}, {eff['dtype']}, clock {eff['clock']}, {eff['torch_threads']} threads")
        for p in eff["points"]:
            eff_rows.append([label, p["batch_size"], p["context_length"], p["prefill_tokens_per_s"], p["decode_tokens_per_s"],
                             p["cache_bytes_per_sequence"], None if p["analytic_cache_bytes"] is None else p["analytic_cache_bytes"] // p["batch_size"],
                             p["peak_memory_bytes"] / 2**20, p["peak_memory_kind"]])
    if eff_rows:
        lines += ["## Efficiency", "", f"Measured on: {'; '.join(sorted(where))}.", ""]
        lines += _table(["model", "batch", "context", "prefill tok/s", "decode tok/s", "cache B/seq (measured)",
                         "cache B/seq (analytic)", "peak MiB", "peak kind"], eff_rows)

    if summary["gates"]:
        lines += ["## Promotion gate", ""]
        for label, gate in summary["gates"].items():
            verdict = "passes" if gate["passed"] else "fails"
            lines.append(f"**{label}** {verdict}" + ("" if gate["checks"] else " (no thresholds set)") + ":")
            lines += [f"- {'ok' if c['passed'] else 'FAIL'}: {c['reason']}" for c in gate["checks"]] + [""]

    if summary["plots"]:
        lines += ["## Charts", ""] + [f"![{name}]({path})" for name, path in summary["plots"].items()] + [""]
    return "\n".join(lines)


def write_report(results: dict[str, dict], out_dir: Path, teacher: str | None = None,
                 gates: dict[str, GateResult] | None = None, histories: dict[str, list[dict]] | None = None) -> dict:
    """Write metrics.json, report.md and the charts for ``results`` ({label: one model's result})."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {}
    for name, fig in (("loss_curves", plot_loss_curves(histories or {})), ("recall", plot_recall(results)),
                      ("pareto", plot_pareto(results, teacher))):
        if fig is not None:
            save_figure(fig, out_dir / PLOTS_DIR / f"{name}.png")
            plots[name] = f"{PLOTS_DIR}/{name}.png"
    models = {}
    for label, result in results.items():
        models[label] = {"result": result, "headline": headline(result)}
        if teacher and label != teacher:
            models[label]["relative_to_teacher"] = relative_to_teacher(result, results[teacher])
    summary = {"teacher": teacher, "models": models, "plots": plots,
               "gates": {label: g.model_dump() for label, g in (gates or {}).items()}}
    atomic_write_text(out_dir / "metrics.json", json.dumps(summary, indent=1, default=float))
    atomic_write_text(out_dir / "report.md", render_markdown(summary))
    return summary
