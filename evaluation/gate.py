"""The promotion gate: headline metrics, ratios to the teacher, and pass/fail with reasons.

A model's evaluation result is a nested dict (quality, tasks, recall, efficiency; see
``evaluation/evaluate.py``). ``headline`` flattens what a gate or a chart needs into
scalars; ``relative_to_teacher`` divides a candidate's numbers by the teacher's at the same
(batch, context) points; ``apply_gate`` checks every threshold the recipe sets. A
threshold that cannot be checked (no teacher, a section not run) fails, saying why: a gate
never passes by not looking.
"""

from __future__ import annotations

import statistics

from pydantic import BaseModel

from evaluation.spec import GateSpec


class GateCheck(BaseModel):
    name: str
    threshold: float
    value: float | None
    passed: bool
    reason: str


class GateResult(BaseModel):
    passed: bool
    checks: list[GateCheck]

    @property
    def reasons(self) -> list[str]:
        """Why it failed (empty when it passed)."""
        return [c.reason for c in self.checks if not c.passed]


def point_key(point: dict) -> str:
    return f"b{point['batch_size']}_L{point['context_length']}"


def headline(result: dict) -> dict[str, float]:
    """The scalars of one model's result: quality, task scores, mean recall, per-point throughput."""
    out: dict[str, float] = {}
    if "model" in result:
        out["parameters"] = float(result["model"]["parameters"])
    for name, value in result.get("quality", {}).items():
        if isinstance(value, int | float):
            out[name] = float(value)
    for task, metrics in result.get("tasks", {}).items():
        for metric, value in metrics.items():
            if not metric.endswith("_stderr"):
                out[f"{task}/{metric}"] = value
    recall = result.get("recall", {})
    if recall.get("mqar"):
        out["mqar_accuracy"] = statistics.fmean(r["accuracy"] for r in recall["mqar"])
    if recall.get("passkey"):
        out["passkey_accuracy"] = statistics.fmean(r["accuracy"] for r in recall["passkey"])
    for point in result.get("efficiency", {}).get("points", []):
        key = point_key(point)
        out[f"prefill_tokens_per_s@{key}"] = point["prefill_tokens_per_s"]
        out[f"decode_tokens_per_s@{key}"] = point["decode_tokens_per_s"]
        out[f"cache_bytes_per_sequence@{key}"] = float(point["cache_bytes_per_sequence"])
    return out


def relative_to_teacher(result: dict, teacher: dict) -> dict:
    """Candidate / teacher: validation loss, and throughput and cache bytes at every shared point.

    ``decode_speedup`` and ``prefill_speedup`` are the smallest ratio over the points (a
    candidate must be faster everywhere it was measured), ``cache_bytes_ratio`` the largest;
    ``points`` holds every ratio."""
    out: dict = {}
    quality, teacher_quality = result.get("quality", {}), teacher.get("quality", {})
    if "val_loss" in quality and "val_loss" in teacher_quality:
        out["val_loss_ratio"] = quality["val_loss"] / teacher_quality["val_loss"]
    teacher_points = {point_key(p): p for p in teacher.get("efficiency", {}).get("points", [])}
    points = {}
    for point in result.get("efficiency", {}).get("points", []):
        base = teacher_points.get(point_key(point))
        if base is not None:
            points[point_key(point)] = {
                "decode_speedup": point["decode_tokens_per_s"] / base["decode_tokens_per_s"],
                "prefill_speedup": point["prefill_tokens_per_s"] / base["prefill_tokens_per_s"],
                "cache_bytes_ratio": point["cache_bytes_per_sequence"] / base["cache_bytes_per_sequence"],
            }
    if points:
        out["points"] = points
        for name, pick in (("decode_speedup", min), ("prefill_speedup", min), ("cache_bytes_ratio", max)):
            key = pick(points, key=lambda k, name=name: points[k][name])
            out[name], out[f"{name}_at"] = points[key][name], key
    return out


# threshold field -> (metric name, "max" or "min", where the metric comes from)
_CHECKS = {
    "max_val_loss": ("val_loss", "max", "headline"),
    "max_val_loss_ratio": ("val_loss_ratio", "max", "teacher"),
    "max_kl_to_teacher": ("kl_to_teacher", "max", "headline"),
    "min_greedy_agreement": ("greedy_agreement", "min", "headline"),
    "min_decode_speedup": ("decode_speedup", "min", "teacher"),
    "min_prefill_speedup": ("prefill_speedup", "min", "teacher"),
    "max_cache_bytes_ratio": ("cache_bytes_ratio", "max", "teacher"),
    "min_mqar_accuracy": ("mqar_accuracy", "min", "headline"),
    "min_passkey_accuracy": ("passkey_accuracy", "min", "headline"),
}


def _check(name: str, metric: str, kind: str, value: float | None, threshold: float, missing: str, where: str = "") -> GateCheck:
    if value is None:
        return GateCheck(name=name, threshold=threshold, value=None, passed=False, reason=f"{metric}: {missing}")
    passed = value <= threshold if kind == "max" else value >= threshold
    relation = ("<=" if passed else ">") if kind == "max" else (">=" if passed else "<")
    return GateCheck(name=name, threshold=threshold, value=value, passed=passed,
                     reason=f"{metric} {value:.4g} {relation} {threshold:.4g}{where}")


def apply_gate(gate: GateSpec, result: dict, teacher: dict | None = None) -> GateResult:
    """Check ``result`` (one model's evaluation) against every threshold set in ``gate``."""
    scalars = headline(result)
    ratios = relative_to_teacher(result, teacher) if teacher is not None else {}
    checks = []
    for field, threshold in gate.thresholds().items():
        if field == "min_task_scores":
            for task, minimum in threshold.items():
                metric = task if "/" in task else _default_metric(scalars, task)
                checks.append(_check(f"min_task_scores.{task}", metric, "min", scalars.get(metric), minimum,
                                     "not measured (is the task in evaluate.tasks.names?)"))
            continue
        metric, kind, source = _CHECKS[field]
        if source == "teacher":
            value = ratios.get(metric)
            missing = "no teacher to compare with" if teacher is None else "not measured for both models"
            where = f" (at {ratios[metric + '_at']})" if metric + "_at" in ratios else ""
        else:
            value, missing, where = scalars.get(metric), "not measured", ""
        checks.append(_check(field, metric, kind, value, threshold, missing, where))
    return GateResult(passed=all(c.passed for c in checks), checks=checks)


def _default_metric(scalars: dict, task: str) -> str:
    """``task/acc`` when the task reports acc, else its first reported metric."""
    if f"{task}/acc" in scalars:
        return f"{task}/acc"
    return next((k for k in scalars if k.startswith(f"{task}/")), f"{task}/acc")
