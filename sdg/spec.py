"""The recipe's ``sdg`` section: every knob of a synthetic-data run, checked before any compute.

    sdg:
      generator: {model: teacher}                # or a folder, s3://..., models:/NAME@ALIAS, or
                                                 # {endpoint: http://host:8000/v1, endpoint_model: NAME}
      open_qa:   {topics: [rivers, prime numbers], subtopics_per_topic: 3, questions_per_topic: 2}
      writing:   {kinds: [essay, poem]}
      math:      {keywords: [fractions], problems_file: gsm8k-like.jsonl}   # question + answer
      code:      {keywords: [list comprehension]}
      instruction_following: {prompts: 20}
      two_turn:  {prompts: 10}
      responses: {per_prompt: 2}
      scorer:    {reward_model: path/to/rm}      # or {judge: {model: ...}}
      filter:    {min_score: 1.0, min_attributes: {correctness: 2.0}}

Pipelines follow Nemotron-4 340B's synthetic data generation (arXiv 2406.11704; NeMo
Curator's ``NemotronGenerator``): topics -> subtopics -> questions -> revised questions,
writing tasks, closed Q&A over documents, math and Python problems from keywords,
instruction-following prompts with verifiable constraints, two-turn prompts. Defaults
(temperature 0.2, top_p 0.7) are NeMo Curator's documented ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator, model_validator

from model.specs import DataSpec, FieldErrors, Section, field_error

# Nemotron-4-340B-Reward's recommended combination of its five HelpSteer2 attributes
# (model card: weights [0, 0, 0, 0, 0.3, 0.74, 0.46, 0.47, -0.33] over its 9 outputs,
# of which the last five are these attributes).
NEMOTRON_REWARD_WEIGHTS = {"helpfulness": 0.3, "correctness": 0.74, "coherence": 0.46,
                           "complexity": 0.47, "verbosity": -0.33}

# Model names the caller resolves before the stage runs (flows/cli.py): the recipe's own
# teacher (pretrained by the recipe, or its start_from).
TEACHER = "teacher"


class GeneratorSpec(Section):
    """Where text comes from: a checkpoint run in-process, or an OpenAI-compatible endpoint.

    ``model`` is a checkpoint folder, ``s3://...``, ``models:/NAME@ALIAS`` or ``teacher``
    (the recipe's teacher); the flow resolves it to a local folder. ``endpoint`` is a base
    URL such as ``http://127.0.0.1:8000/v1`` (vLLM, NIM, ``transformers serve``); the API
    key, if any, is read from the environment variable ``api_key_env`` and never stored.
    """

    model: str | None = None
    endpoint: str | None = None
    endpoint_model: str = ""  # the request's "model" field; default: the first of GET /models
    api_key_env: str = "OPENAI_API_KEY"
    batch_size: PositiveInt = 8  # in-process: prompts per generate() call
    max_concurrency: PositiveInt = 8  # endpoint: requests in flight, independent of batch_size
    timeout_s: PositiveFloat = 120.0  # endpoint: per request
    max_retries: NonNegativeInt = 6  # endpoint: on 429, 5xx, timeouts and dropped connections
    backoff_s: PositiveFloat = 1.0  # first retry delay; doubles each time (with jitter), Retry-After wins
    max_backoff_s: PositiveFloat = 60.0
    temperature: float = Field(0.2, ge=0)  # 0 = greedy
    top_p: float = Field(0.7, gt=0, le=1)
    max_new_tokens: PositiveInt = 512
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _one_source(self):
        if (self.model is None) == (self.endpoint is None):
            raise field_error("model", "set exactly one of model (a checkpoint) or endpoint (an OpenAI-compatible URL)")
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise field_error("endpoint", f"must be an http(s) URL such as http://127.0.0.1:8000/v1, got {self.endpoint!r}")
        if self.model is not None and not self.model.startswith(("models:/", "s3://")) and self.model != TEACHER:
            if not (Path(self.model).expanduser() / "config.json").is_file():
                raise field_error("model", f"no checkpoint (config.json) at {self.model}; expected a folder, "
                                           f"s3://..., models:/NAME@ALIAS or {TEACHER!r}")
        return self


def _read_lines(path: str) -> list[str]:
    return [line.strip() for line in Path(path).expanduser().read_text().splitlines() if line.strip()]


class OpenQASpec(Section):
    """Topics -> subtopics -> open questions -> revised (more detailed) questions."""

    topics: list[str] = Field(default_factory=list)  # seed macro topics (the paper mixes in manual ones)
    generate_topics: NonNegativeInt = 0  # macro topics to ask the generator for, in addition
    subtopics_per_topic: NonNegativeInt = 3
    questions_per_topic: PositiveInt = 2
    revise: bool = True

    @model_validator(mode="after")
    def _some_topic(self):
        if not self.topics and not self.generate_topics:
            raise field_error("topics", "give seed topics or set generate_topics > 0")
        return self


class WritingSpec(Section):
    """"Write a <kind> about <topic>" tasks, then revised to add detail."""

    topics: list[str] = Field(default_factory=list)  # default: the open_qa topics after dedup
    kinds: list[str] = Field(default_factory=lambda: ["essay", "poem", "newsletter", "short story"], min_length=1)
    tasks_per_topic: PositiveInt = 1  # per (topic, kind)
    revise: bool = True


class ClosedQASpec(Section):
    """Instructions about documents from any factory data source, joined to the document."""

    data: DataSpec
    max_documents: PositiveInt = 50
    max_chars: PositiveInt = 2000  # documents are cut to this many characters
    instructions_per_document: PositiveInt = 2


class ProblemSpec(Section):
    """Math or Python problems: one or more per keyword, plus given problems with a ground truth.

    ``problems_file`` is JSONL with ``question`` and, for math, ``answer`` (compared with
    the final answer of each response) or, for code, ``tests`` (Python asserts run after
    each response's code in the sandbox).
    """

    keywords: list[str] = Field(default_factory=list)
    keywords_file: str | None = None  # one keyword per line
    problems_per_keyword: PositiveInt = 1
    problems_file: str | None = None

    @field_validator("keywords_file", "problems_file")
    @classmethod
    def _exists(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).expanduser().is_file():
            raise ValueError(f"file not found: {path}")
        return path

    @model_validator(mode="after")
    def _something(self):
        if not self.keywords and self.keywords_file is None and self.problems_file is None:
            raise field_error("keywords", "give keywords, a keywords_file or a problems_file")
        if self.problems_file is not None:
            problems = {}
            for i, line in enumerate(Path(self.problems_file).expanduser().read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    problems[f"problems_file:{i}"] = f"not JSON: {e}"
                    continue
                if not isinstance(row, dict) or not isinstance(row.get("question"), str):
                    problems[f"problems_file:{i}"] = "each line needs a string field 'question'"
            if problems:
                raise FieldErrors(problems)
        return self

    def all_keywords(self) -> list[str]:
        return list(self.keywords) + (_read_lines(self.keywords_file) if self.keywords_file else [])

    def given_problems(self) -> list[dict]:
        if self.problems_file is None:
            return []
        lines = Path(self.problems_file).expanduser().read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]


CONSTRAINT_KINDS = ("min_words", "max_words", "paragraphs", "keywords", "no_commas", "lowercase", "uppercase",
                    "end_phrase", "quotation", "bullets", "title", "json")


class InstructionFollowingSpec(Section):
    """Prompts from the other pipelines with verifiable constraints appended (IFEval-style)."""

    prompts: PositiveInt = 20
    constraints: list[Literal[CONSTRAINT_KINDS]] = Field(default_factory=lambda: list(CONSTRAINT_KINDS), min_length=1)
    constraints_per_prompt: PositiveInt = 1


class TwoTurnSpec(Section):
    """User / Assistant / User prompts: a first turn from the other pipelines, the assistant's
    reply and the user's follow-up written by the generator."""

    prompts: PositiveInt = 10


class ResponsesSpec(Section):
    per_prompt: PositiveInt = 2  # several responses per prompt: preference pairs need two


class ScorerSpec(Section):
    """How responses are scored and pairs ranked (after ground truth and verifiers).

    ``reward_model`` is a checkpoint with several attribute outputs (see sdg/scorers.py for
    the format); ``weights`` combine them into one score (default: Nemotron-4-340B-Reward's
    published weights). ``judge`` is a generator asked which of two responses is better,
    in both orders; a pair is kept only when both orders agree.
    """

    reward_model: str | None = None  # a folder, s3://... or models:/NAME@ALIAS
    weights: dict[str, float] = Field(default_factory=lambda: dict(NEMOTRON_REWARD_WEIGHTS))
    batch_size: PositiveInt = 8
    max_tokens: PositiveInt = 4096  # reward-model context (Nemotron-4-340B-Reward: 4,096)
    judge: GeneratorSpec | None = None
    rank_by: Literal["auto", "reward_model", "judge"] = "auto"  # auto: the reward model when there is one
    min_margin: float = Field(0.0, ge=0)  # reward-model pairs: chosen - rejected score at least this

    @field_validator("reward_model")
    @classmethod
    def _reward_model_exists(cls, path: str | None) -> str | None:
        if path is not None and not path.startswith(("models:/", "s3://")):
            if not (Path(path).expanduser() / "config.json").is_file():
                raise ValueError(f"no checkpoint (config.json) at {path}")
        return path

    @model_validator(mode="after")
    def _ranker_exists(self):
        if self.rank_by == "reward_model" and self.reward_model is None:
            raise field_error("reward_model", "rank_by: reward_model needs a reward_model")
        if self.rank_by == "judge" and self.judge is None:
            raise field_error("judge", "rank_by: judge needs a judge")
        return self

    @property
    def ranker(self) -> str | None:
        if self.rank_by != "auto":
            return self.rank_by
        return "reward_model" if self.reward_model else ("judge" if self.judge else None)


class FilterSpec(Section):
    """Thresholds applied to stored scores when the output is written: changing them
    re-writes the datasets without generating or scoring anything again."""

    min_score: float | None = None  # the weighted reward score
    min_attributes: dict[str, float] = Field(default_factory=dict)  # e.g. {correctness: 2.0}
    max_attributes: dict[str, float] = Field(default_factory=dict)  # e.g. {verbosity: 3.5}
    require_verified: bool = True  # SFT keeps no response that fails its ground truth or verifier


class DedupSpec(Section):
    """Exact (normalized text) and MinHash near-duplicate removal, on topics and prompts
    before responses are generated and on responses after."""

    enabled: bool = True
    near_threshold: float = Field(0.8, gt=0, le=1)  # estimated Jaccard similarity of character shingles
    num_perm: PositiveInt = 128
    shingle_size: PositiveInt = 5  # characters


class VerifySpec(Section):
    """The code sandbox: a subprocess with CPU time, wall time, memory and file-size limits
    and no network (an audit hook, plus a network namespace when ``unshare`` works)."""

    code_timeout_s: PositiveFloat = 5.0
    code_memory_mb: PositiveInt = 512
    network_namespace: Literal["auto", "on", "off"] = "auto"  # auto: when `unshare -rn` works here


class SDGSpec(Section):
    """A synthetic-data run: generator, prompt pipelines, responses, scoring, filters."""

    generator: GeneratorSpec
    open_qa: OpenQASpec | None = None
    writing: WritingSpec | None = None
    closed_qa: ClosedQASpec | None = None
    math: ProblemSpec | None = None
    code: ProblemSpec | None = None
    instruction_following: InstructionFollowingSpec | None = None
    two_turn: TwoTurnSpec | None = None
    responses: ResponsesSpec = ResponsesSpec()
    scorer: ScorerSpec = ScorerSpec()
    filter: FilterSpec = FilterSpec()
    dedup: DedupSpec = DedupSpec()
    verify: VerifySpec = VerifySpec()
    formats: list[Literal["jsonl", "parquet"]] = Field(default_factory=lambda: ["jsonl", "parquet"], min_length=1)
    seed: int = 0

    @model_validator(mode="after")
    def _pipelines(self):
        base = ("open_qa", "writing", "closed_qa", "math", "code")
        if not any(getattr(self, name) is not None for name in base):
            raise field_error("open_qa", f"enable at least one prompt pipeline: {', '.join(base)}")
        if self.writing is not None and not self.writing.topics and self.open_qa is None:
            raise field_error("writing.topics", "give topics, or enable open_qa to take its topics")
        unknown = sorted(set(self.filter.min_attributes) | set(self.filter.max_attributes)) if not self.scorer.reward_model else []
        if unknown:
            raise field_error("filter", f"attribute thresholds ({', '.join(unknown)}) need scorer.reward_model")
        if self.filter.min_score is not None and not self.scorer.reward_model:
            raise field_error("filter.min_score", "needs scorer.reward_model")
        return self

    def checkpoints(self) -> dict[str, str]:
        """Model names the caller must resolve into local folders: {input name: uri}."""
        named = {"generator": self.generator.model, "reward_model": self.scorer.reward_model,
                 "judge": self.scorer.judge.model if self.scorer.judge else None}
        return {k: v for k, v in named.items() if v is not None}

    def describe(self) -> str:
        """One line for ``factory validate``."""
        g = self.generator
        source = g.model if g.model is not None else f"{g.endpoint} ({g.endpoint_model or 'its first model'})"
        pipelines = [name for name in ("open_qa", "writing", "closed_qa", "math", "code", "instruction_following",
                                       "two_turn") if getattr(self, name) is not None]
        ranking = "ground truth/verifiers" + (f", then {self.scorer.ranker}" if self.scorer.ranker else " only")
        return (f"generator {source}; pipelines {', '.join(pipelines)}; {self.responses.per_prompt} responses "
                f"per prompt; pairs by {ranking}")
