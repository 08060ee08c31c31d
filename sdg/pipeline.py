"""The SDG pipeline: Nemotron-4 340B's synthetic-data steps as plain functions over a ``Run``.

    prompts (topics -> dedup -> questions, writing, closed Q&A, math, code, IF, two-turn)
      -> dedup prompts -> responses (several per prompt) -> verifiers -> reward model
      -> pairs (ground truth / verifier, else reward model or judge in both orders)
      -> dedup responses -> thresholds -> sft + preference rows

Resumable per record: every generation, verdict and score is kept in the recipe's working
folder under a hash of what decides it (sdg/shards.py), and every step asks only for the
records it does not hold. A run killed anywhere continues where it stopped; a run with
new thresholds, weights or output formats generates and scores nothing again (no model is
even loaded). The stage around it (inputs, caching, publishing) is ``sdg/sdg_stage.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from model.contract import code_version
from model.device import DevicePolicy
from sdg import prompts as P
from sdg.backends import ChatRequest, open_generator
from sdg.dedup import dedup
from sdg.output import render_conversation
from sdg.responses import choose_pair, has_verifier, score_of, verify
from sdg.scorers import (
    RewardModel,
    agreed_winner,
    judge_messages,
    parse_verdict,
    render_prompt,
    weight_problems,
)
from sdg.shards import RecordStore, record_key
from sdg.spec import SDGSpec
from sdg.verifiers import math_checker_version

Progress = Callable[[str, int, int], None]  # (step, done, total): e.g. a Prefect progress artifact


class Run:
    """One SDG run's state: the record shards, lazily opened models, counts per step."""

    def __init__(self, spec: SDGSpec, folders: dict[str, Path], identities: dict[str, str], records: RecordStore,
                 progress: Progress | None, devices: DevicePolicy | None = None):
        self.spec, self.folders, self.identities, self.records = spec, folders, identities, records
        self.progress, self.devices = progress, devices or DevicePolicy()
        self.stats: dict[str, dict[str, int]] = {}
        self._backends: dict[str, object] = {}
        self._reward_model: RewardModel | None = None

    # ----- models, opened on first use: a fully cached run loads none

    def backend(self, who: str):
        if who not in self._backends:
            if who == "judge" and self.identities["judge"] == self.identities["generator"] and \
                    self.spec.scorer.judge.model is not None:
                self._backends[who] = self.backend("generator")  # one copy of the weights serves both roles
            else:
                spec = self.spec.generator if who == "generator" else self.spec.scorer.judge
                device = None if spec.endpoint else self.devices.choose(spec.device, f"sdg.{self._field(who)}.device")
                self._backends[who] = open_generator(spec, self.folders.get(who), seed=self.spec.seed, device=device)
        return self._backends[who]

    def reward_model(self) -> RewardModel:
        if self._reward_model is None:
            s = self.spec.scorer
            device = self.devices.choose(self.spec.generator.device, "sdg.generator.device")
            self._reward_model = RewardModel(self.folders["reward_model"], s.batch_size, device, s.max_tokens)
            if problems := weight_problems(self._reward_model.attributes, s.weights):
                raise ValueError(f"sdg.scorer: {problems[0]}")
        return self._reward_model

    @staticmethod
    def _field(who: str) -> str:
        return "generator" if who == "generator" else "scorer.judge"

    def close(self) -> None:
        for backend in {id(b): b for b in self._backends.values()}.values():
            backend.close()
        self.records.close()

    # ----- bookkeeping

    def count(self, step: str, **counts: int) -> None:
        entry = self.stats.setdefault(step, {})
        for name, n in counts.items():
            entry[name] = entry.get(name, 0) + n

    def _bar(self, step: str, total: int):
        return tqdm(total=total, desc=f"sdg {step}", unit=" rec", leave=False, disable=not sys.stderr.isatty())

    # ----- the one way anything is generated

    def ask(self, step: str, prompts: list, samples: list[int] | None = None, who: str = "generator") -> list[str]:
        """Texts for chat ``prompts`` (message lists), in order; generates only keys the
        step's shards lack and keeps each result the moment it arrives."""
        g = self.spec.generator if who == "generator" else self.spec.scorer.judge
        requests = [ChatRequest(messages=list(m), max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                                top_p=g.top_p, sample=s) for m, s in zip(prompts, samples or [0] * len(prompts), strict=True)]
        identity = self.identities[who]
        keys = [record_key(step, identity, r.key_parts()) for r in requests]
        shards = self.records.step(step)
        missing: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key not in shards and key not in missing:
                missing[key] = i
        self.count(step, requested=len(set(keys)), reused=len(set(keys)) - len(missing), generated=len(missing))
        if missing:
            todo = list(missing)
            with self._bar(step, len(todo)) as bar:
                for j, text in self.backend(who).generate_iter([requests[missing[k]] for k in todo]):
                    shards.append(todo[j], text)
                    bar.update(1)
                    if self.progress:
                        self.progress(step, bar.n, len(todo))
        return [shards.get(k) for k in keys]

    def cached(self, step: str, items: list[tuple[str, object]], compute: Callable[[list], list]) -> list:
        """Values for ``(key, input)`` items: stored ones reused, the rest computed in one
        call of ``compute(inputs)`` per chunk and kept as they come."""
        shards = self.records.step(step)
        missing = [(k, x) for k, x in dict(items).items() if k not in shards]
        self.count(step, requested=len(dict(items)), reused=len(dict(items)) - len(missing), generated=len(missing))
        chunk = 64
        with self._bar(step, len(missing)) as bar:
            for start in range(0, len(missing), chunk):
                part = missing[start : start + chunk]
                for (key, _), value in zip(part, compute([x for _, x in part]), strict=True):
                    shards.append(key, value)
                bar.update(len(part))
                if self.progress:
                    self.progress(step, bar.n, len(missing))
        return [shards.get(k) for k, _ in items]

    def dedup(self, texts: list[str]) -> list[int]:
        d = self.spec.dedup
        if not d.enabled:
            return list(range(len(texts)))
        return dedup(texts, d.near_threshold, d.num_perm, d.shingle_size, self.spec.seed)


# --------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------


def build_prompts(spec: SDGSpec, run: Run) -> list[dict]:
    """Every pipeline's prompts, then exact and near duplicates removed (before any response)."""
    base: list[dict] = []
    topic_list: list[str] = []
    if spec.open_qa is not None:
        topic_list = P.topics(spec.open_qa, run.ask, run.dedup)
        run.count("topics", kept=len(topic_list))
        base += P.open_qa_prompts(spec.open_qa, topic_list, run.ask)
    if spec.writing is not None:
        base += P.writing_prompts(spec.writing, topic_list, run.ask)
    if spec.closed_qa is not None:
        base += P.closed_qa_prompts(spec.closed_qa, run.ask)
    for kind in ("math", "code"):
        if getattr(spec, kind) is not None:
            base += P.problem_prompts(kind, getattr(spec, kind), run.ask)
    prompts = list(base)
    if spec.instruction_following is not None:
        prompts += P.instruction_following_prompts(spec.instruction_following, base, spec.seed)
    if spec.two_turn is not None:
        prompts += P.two_turn_prompts(spec.two_turn, base, run.ask, spec.seed)
    keep = run.dedup([render_prompt(p["messages"]) for p in prompts])
    run.count("prompts", built=len(prompts), kept=len(keep), duplicates=len(prompts) - len(keep))
    kept = [prompts[i] for i in keep]
    for kind in sorted({p["kind"] for p in kept}):
        run.count("prompts_by_kind", **{kind: sum(p["kind"] == kind for p in kept)})
    return kept


def generate_responses(spec: SDGSpec, run: Run, prompts: list[dict]) -> dict[str, list[dict]]:
    """prompt id -> its responses ``{"key", "sample", "text"}``."""
    n = spec.responses.per_prompt
    asks = [(p, s) for p in prompts for s in range(n)]
    texts = run.ask("responses", [p["messages"] for p, _ in asks], [s for _, s in asks])
    identity = run.identities["generator"]
    by_prompt: dict[str, list[dict]] = {p["id"]: [] for p in prompts}
    for (p, s), text in zip(asks, texts, strict=True):
        key = record_key("response", identity, p["id"], s)
        by_prompt[p["id"]].append({"key": key, "sample": s, "text": text})
    return by_prompt


def check_responses(spec: SDGSpec, run: Run, prompts: list[dict], by_prompt: dict[str, list[dict]]) -> None:
    """Attach each response's verdict (ground truth / verifier, None without one), kept in the shards."""
    version = code_version("sdg.responses")  # a fixed verifier (or its parsing) judges again,
    if any("answer" in p for p in prompts):  # and so does a new math-verify
        version = record_key(version, math_checker_version())
    key = lambda p, r: record_key("verdict", version, spec.verify.model_dump(), p, r["text"])
    checked = [(p, r) for p in prompts if has_verifier(p) for r in by_prompt[p["id"]]]
    values = run.cached("verdicts", [(key(p, r), (p, r["text"])) for p, r in checked],
                        lambda xs: [verify(p, text, spec.verify) for p, text in xs])
    for (_, r), verdict in zip(checked, values, strict=True):
        r["verdict"] = verdict
    for p in prompts:
        if not has_verifier(p):
            for r in by_prompt[p["id"]]:
                r["verdict"] = None


def score_responses(spec: SDGSpec, run: Run, prompts: list[dict], by_prompt: dict[str, list[dict]]) -> None:
    """Attach each response's per-attribute reward-model scores (None without a reward
    model, or for an empty response), kept in the shards."""
    for responses in by_prompt.values():
        for r in responses:
            r["scores"] = None
    if "reward_model" not in run.identities:
        return
    identity = run.identities["reward_model"]
    scored = [(p["messages"] + [{"role": "assistant", "content": r["text"]}], r)
              for p in prompts for r in by_prompt[p["id"]] if r["text"].strip()]
    values = run.cached("reward_scores", [(record_key("scores", identity, c), c) for c, _ in scored],
                        lambda conversations: run.reward_model().score(conversations))
    for (_, r), scores in zip(scored, values, strict=True):
        r["scores"] = scores


def rank_pairs(spec: SDGSpec, run: Run, prompts: list[dict], by_prompt: dict[str, list[dict]]) -> list[dict]:
    """One pair per prompt where one can be ranked; judge pairs asked in both orders."""
    s = spec.scorer
    pairs, to_judge = [], []
    for p in prompts:
        choice = choose_pair(by_prompt[p["id"]], s.ranker, s.weights, s.min_margin)
        if choice is None:
            run.count("pairs", unranked=1)
        elif "judge" in choice:
            to_judge.append((p, *choice["judge"]))
        else:
            pairs.append({"prompt": p, **choice})
    if to_judge:
        asks = [judge_messages(p["messages"], x["text"], y["text"]) for p, x, y in to_judge]
        asks += [judge_messages(p["messages"], y["text"], x["text"]) for p, x, y in to_judge]
        verdicts = [parse_verdict(t) for t in run.ask("judge", asks, who="judge")]
        for i, (p, x, y) in enumerate(to_judge):
            winner = agreed_winner(verdicts[i], verdicts[len(to_judge) + i])
            if winner is None:
                run.count("pairs", judge_disagreed=1)
                continue
            chosen, rejected = (x, y) if winner == 0 else (y, x)
            pairs.append({"prompt": p, "chosen": chosen, "rejected": rejected, "ranked_by": "judge"})
    for pair in pairs:
        run.count("pairs", **{f"by_{pair['ranked_by']}": 1})
    return pairs


def passes_filter(spec: SDGSpec, response: dict) -> str | None:
    """Why a response is not kept for SFT, or None when it is."""
    f, scores = spec.filter, response.get("scores")
    if not response["text"].strip():
        return "empty"
    if f.require_verified and response.get("verdict") is not None and not response["verdict"]["passed"]:
        return "failed_verification"
    if scores is not None:
        if f.min_score is not None and score_of(response, spec.scorer.weights) < f.min_score:
            return "below_min_score"
        if any(scores.get(a, float("-inf")) < v for a, v in f.min_attributes.items()):
            return "below_min_attribute"
        if any(scores.get(a, float("inf")) > v for a, v in f.max_attributes.items()):
            return "above_max_attribute"
    return None


def sft_rows(spec: SDGSpec, run: Run, prompts: list[dict], by_prompt: dict[str, list[dict]]) -> list[dict]:
    """Every non-empty response, deduplicated, then filtered. The order is fixed by the records
    alone (score, then id: never the order responses completed or shards were written), and dedup
    comes before the thresholds, so which twin of a near-duplicate group survives does not depend
    on them: a stricter filter only removes rows."""
    weights = spec.scorer.weights
    candidates = []
    for p in prompts:
        for r in by_prompt[p["id"]]:
            if not r["text"].strip():
                run.count("sft", dropped_empty=1)
                continue
            messages = p["messages"] + [{"role": "assistant", "content": r["text"]}]
            verdict = r.get("verdict")
            candidates.append((r, {
                "id": r["key"], "prompt_id": p["id"], "kind": p["kind"], "sample": r["sample"],
                "text": render_conversation(messages), "messages": messages,
                "prompt": render_prompt(p["messages"]), "response": r["text"],
                "scores": r.get("scores"), "score": score_of(r, weights),
                "verified": verdict["passed"] if verdict else None, "verified_by": verdict["by"] if verdict else None,
                "meta": p["meta"], "generator": run.identities["generator"],
            }))
    # Best first, so the copy a near-duplicate group keeps is its best-scored one (ties: lowest id).
    candidates.sort(key=lambda c: (-(c[1]["score"] if c[1]["score"] is not None else 0.0), c[1]["id"]))
    keep = run.dedup([f"{row['prompt']}\n{row['response']}" for _, row in candidates])
    run.count("sft", dropped_duplicate=len(candidates) - len(keep))
    rows = []
    for r, row in (candidates[i] for i in keep):
        if (reason := passes_filter(spec, r)) is not None:
            run.count("sft", **{f"dropped_{reason}": 1})
            continue
        rows.append(row)
    run.count("sft", kept=len(rows))
    return rows


def preference_rows(spec: SDGSpec, run: Run, pairs: list[dict]) -> list[dict]:
    weights, rows = spec.scorer.weights, []
    for pair in pairs:
        p, chosen, rejected = pair["prompt"], pair["chosen"], pair["rejected"]
        if len(run.dedup([chosen["text"], rejected["text"]])) < 2:
            run.count("preference", dropped_near_identical=1)  # no signal in a pair of twins
            continue
        rows.append({
            "id": record_key("pair", chosen["key"], rejected["key"]), "prompt_id": p["id"], "kind": p["kind"],
            "prompt": render_prompt(p["messages"]), "prompt_messages": p["messages"],
            "chosen_response": chosen["text"], "rejected_response": rejected["text"],
            "chosen_reward": score_of(chosen, weights), "rejected_reward": score_of(rejected, weights),
            "chosen_scores": chosen.get("scores"), "rejected_scores": rejected.get("scores"),
            "ranked_by": pair["ranked_by"], "meta": p["meta"],
            "text": render_conversation(p["messages"] + [{"role": "assistant", "content": chosen["text"]}]),
        })
    run.count("preference", kept=len(rows))
    return rows
