"""Responses: verdicts of the verifiers, and which two responses make a preference pair.

Ranking follows Nemotron-4 340B's order of trust:

1. ground truth (a math answer) or a verifier (instruction constraints, code that runs
   and passes its tests): the chosen response passes, the rejected one fails; when none
   passes there is no pair (nothing correct to prefer); when all pass, the scorer decides;
2. the reward model: the highest and lowest weighted score, at least ``min_margin`` apart;
3. the judge: two responses asked in both orders, kept when both orders agree.
"""

from __future__ import annotations

from sdg.scorers import combine
from sdg.spec import VerifySpec
from sdg.verifiers import answer_matches, check_constraints, verify_code


def has_verifier(prompt: dict) -> bool:
    return "answer" in prompt or bool(prompt.get("constraints")) or prompt["kind"] == "code"


def verify(prompt: dict, response: str, spec: VerifySpec) -> dict | None:
    """{"passed": bool, "by": "ground_truth" | "verifier", ...details}, or None when the
    prompt has nothing to check against."""
    if "answer" in prompt:
        return {"passed": answer_matches(response, prompt["answer"]), "by": "ground_truth"}
    if prompt.get("constraints"):
        checks = check_constraints(response, prompt["constraints"])
        return {"passed": all(checks.values()), "by": "verifier", "checks": checks}
    if prompt["kind"] == "code":
        result = verify_code(response, prompt.get("tests", ""), timeout_s=spec.code_timeout_s,
                             memory_mb=spec.code_memory_mb, sandbox=spec.sandbox)
        error = result.stderr.strip().splitlines()[-1:] if not result.passed else []
        return {"passed": result.passed, "by": "ground_truth" if prompt.get("tests") else "verifier",
                "timed_out": result.timed_out, "error": error[0][:200] if error else ""}
    return None


def score_of(response: dict, weights: dict[str, float]) -> float | None:
    return combine(response["scores"], weights) if response.get("scores") else None


def choose_pair(responses: list[dict], ranker: str | None, weights: dict[str, float],
                min_margin: float = 0.0) -> dict | None:
    """From one prompt's responses (``{"key", "text", "verdict", "scores"}``): a pair
    ``{"chosen", "rejected", "ranked_by"}``, ``{"judge": (x, y)}`` when the judge must
    decide, or None when no pair can be ranked."""
    responses = [r for r in responses if r["text"].strip()]
    by_score = lambda r: score_of(r, weights) if r.get("scores") else 0.0
    if any(r.get("verdict") is not None for r in responses):
        passed = [r for r in responses if r.get("verdict") and r["verdict"]["passed"]]
        failed = [r for r in responses if not (r.get("verdict") and r["verdict"]["passed"])]
        if passed and failed:
            return {"chosen": max(passed, key=by_score), "rejected": min(failed, key=by_score),
                    "ranked_by": passed[0]["verdict"]["by"]}
        if not passed:
            return None
        responses = passed
    if len(responses) < 2:
        return None
    if ranker == "reward_model":
        ranked = sorted(responses, key=by_score)
        low, high = ranked[0], ranked[-1]
        margin = by_score(high) - by_score(low)
        if margin <= 0 or margin < min_margin:
            return None
        return {"chosen": high, "rejected": low, "ranked_by": "reward_model"}
    if ranker == "judge":
        return {"judge": (responses[0], responses[1])}
    return None
