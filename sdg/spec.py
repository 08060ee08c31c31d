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

from model.spec import DataSpec, FieldErrors, Section, field_error

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

    model: str | None = Field(
        None,
        description="A checkpoint run in this process: a folder, `s3://...`, `models:/NAME@ALIAS` or `teacher` "
                    "(the recipe's teacher: pretrained by the recipe, or its start_from). Set this or `endpoint`.",
    )
    endpoint: str | None = Field(
        None,
        description="Base URL of an OpenAI-compatible server, e.g. `http://127.0.0.1:8000/v1` (vLLM, NIM, "
                    "`transformers serve`); requests go to its `/chat/completions`. Set this or `model`.",
    )
    endpoint_model: str = Field(
        "",
        description="Endpoint only: the requests' `model` field; empty uses the first model `GET /models` lists.",
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="Endpoint only: the environment variable whose value, when set, is sent as the Bearer API "
                    "key; the key itself is never stored.",
    )
    batch_size: PositiveInt = Field(8, description="In-process model only: prompts per generate() call.")
    max_concurrency: PositiveInt = Field(
        8, description="Endpoint only: requests in flight at once, independent of `batch_size`.",
    )
    timeout_s: PositiveFloat = Field(
        120.0, description="Endpoint only: seconds allowed per request (at most 10 of them to connect).",
    )
    max_retries: NonNegativeInt = Field(
        6,
        description="Endpoint only: retries of a request after a timeout, a dropped connection or HTTP 408, 409, "
                    "425, 429, 500, 502, 503 or 504; any other error fails at once.",
    )
    backoff_s: PositiveFloat = Field(
        1.0,
        description="Endpoint only: the first retry waits about this many seconds and each later one twice as "
                    "long, with jitter; a server's Retry-After wins.",
    )
    max_backoff_s: PositiveFloat = Field(
        60.0, description="Endpoint only: the longest wait before a retry, in seconds, Retry-After included.",
    )
    temperature: float = Field(0.2, ge=0, description="Sampling temperature of every request; 0 = greedy.")
    top_p: float = Field(
        0.7, gt=0, le=1,
        description="Nucleus sampling: tokens are drawn from the smallest set whose probabilities reach top_p.",
    )
    max_new_tokens: PositiveInt = Field(512, description="Most tokens generated per request.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where an in-process model runs: `auto` (CUDA when torch sees a GPU, else the CPU), `cpu` or "
                    "`cuda`. The reward model runs on `sdg.generator.device` too, even with an endpoint generator.",
    )

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

    topics: list[str] = Field(
        default_factory=list,
        description="Seed macro topics (the paper mixes generated topics with manual ones).",
    )
    generate_topics: NonNegativeInt = Field(
        0,
        description="Macro topics to ask the generator for, in addition to `topics`; give seed topics, this, or "
                    "both.",
    )
    subtopics_per_topic: NonNegativeInt = Field(
        3, description="Subtopics asked for per macro topic and added to the topics; 0 asks for none.",
    )
    questions_per_topic: PositiveInt = Field(
        2, description="Questions asked for per topic, macro topics and subtopics alike.",
    )
    revise: bool = Field(
        True,
        description="Ask the generator to revise each question to add context, constraints or a required answer "
                    "format.",
    )

    @model_validator(mode="after")
    def _some_topic(self):
        if not self.topics and not self.generate_topics:
            raise field_error("topics", "give seed topics or set generate_topics > 0")
        return self


class WritingSpec(Section):
    """"Write a <kind> about <topic>" tasks, then revised to add detail."""

    topics: list[str] = Field(
        default_factory=list,
        description="Topics of the writing tasks; empty uses the open_qa topics after dedup (then open_qa is "
                    "needed).",
    )
    kinds: list[str] = Field(
        default_factory=lambda: ["essay", "poem", "newsletter", "short story"], min_length=1,
        description="Forms of writing to ask for; every topic gets tasks of every kind.",
    )
    tasks_per_topic: PositiveInt = Field(1, description="Tasks asked for per (topic, kind) pair.")
    revise: bool = Field(
        True, description="Ask the generator to revise each task to add more detailed requirements.",
    )


class ClosedQASpec(Section):
    """Instructions about documents from any factory data source, joined to the document."""

    data: DataSpec = Field(
        description="Required: where the documents come from, written like the recipe's `data` section; "
                    "`source`, `text_field` and `max_documents` apply here.",
    )
    max_documents: PositiveInt = Field(50, description="Documents used: the first N non-empty ones of the source.")
    max_chars: PositiveInt = Field(2000, description="Each document is cut to this many characters.")
    instructions_per_document: PositiveInt = Field(
        2,
        description="Instructions (questions or tasks) asked for per document; each becomes a prompt joined to "
                    "its document.",
    )


class ProblemSpec(Section):
    """Math or Python problems: one or more per keyword, plus given problems with a ground truth.

    ``problems_file`` is JSONL with ``question`` and, for math, ``answer`` (compared with
    the final answer of each response) or, for code, ``tests`` (Python asserts run after
    each response's code in the sandbox).
    """

    keywords: list[str] = Field(
        default_factory=list, description="Keywords to ask for problems about, e.g. `fractions`.",
    )
    keywords_file: str | None = Field(
        None, description="A text file of keywords, one per line, added to `keywords`; null: none.",
    )
    problems_per_keyword: PositiveInt = Field(1, description="Problems asked for per keyword.")
    problems_file: str | None = Field(
        None,
        description="A JSONL file of given problems, one per line: `question`, plus for math an `answer` (compared "
                    "with each response's final answer) or for code `tests` (Python asserts run after the "
                    "response's code in the sandbox); null: none.",
    )

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

    prompts: PositiveInt = Field(
        20,
        description="Prompts to make, each from a different open_qa, writing or closed_qa prompt (any prompt when "
                    "there are none); fewer when there are fewer to draw from.",
    )
    constraints: list[Literal[CONSTRAINT_KINDS]] = Field(
        default_factory=lambda: list(CONSTRAINT_KINDS), min_length=1,
        description="Constraint kinds to draw from (by default all of them).",
    )
    constraints_per_prompt: PositiveInt = Field(
        1,
        description="Different constraints appended to each prompt (at most the number of `constraints`).",
    )


class TwoTurnSpec(Section):
    """User / Assistant / User prompts: a first turn from the other pipelines, the assistant's
    reply and the user's follow-up written by the generator."""

    prompts: PositiveInt = Field(
        10,
        description="Two-turn prompts to make, each from a different open_qa, writing or closed_qa prompt (any "
                    "prompt when there are none); fewer when there are fewer to draw from.",
    )


class ResponsesSpec(Section):
    """How many responses the generator writes for every prompt."""

    per_prompt: PositiveInt = Field(
        2, description="Responses sampled per prompt; a preference pair needs at least two.",
    )


class ScorerSpec(Section):
    """How responses are scored and pairs ranked (after ground truth and verifiers).

    ``reward_model`` is a checkpoint with several attribute outputs (see sdg/scorers.py for
    the format); ``weights`` combine them into one score (default: Nemotron-4-340B-Reward's
    published weights). ``judge`` is a generator asked which of two responses is better,
    in both orders; a pair is kept only when both orders agree.
    """

    reward_model: str | None = Field(
        None,
        description="A reward-model checkpoint (a causal LM plus a reward head, or a *ForSequenceClassification "
                    "model; see sdg/scorers.py): a folder, `s3://...` or `models:/NAME@ALIAS`; null: none. It runs "
                    "on `sdg.generator.device`.",
    )
    weights: dict[str, float] = Field(
        default_factory=lambda: dict(NEMOTRON_REWARD_WEIGHTS),
        description="Weight per reward-model attribute, summed into one score; every name must be an attribute of "
                    "the reward model.",
    )
    batch_size: PositiveInt = Field(8, description="Conversations per reward-model forward pass.")
    max_tokens: PositiveInt = Field(
        4096,
        description="Reward-model context in tokens; a longer conversation keeps its end (Nemotron-4-340B-Reward: "
                    "4,096).",
    )
    judge: GeneratorSpec | None = Field(
        None,
        description="A generator asked which of two responses is better, in both orders (when it names the same "
                    "checkpoint as the generator, the loaded one is reused); null: no judge.",
    )
    rank_by: Literal["auto", "reward_model", "judge"] = Field(
        "auto",
        description="What ranks the pairs that ground truth and verifiers leave open: `reward_model`, `judge`, or "
                    "`auto` (the reward model when there is one, else the judge, else nothing).",
    )
    min_margin: float = Field(
        0.0, ge=0,
        description="Reward-model pairs: the chosen response's score must exceed the rejected one's by at least "
                    "this (and by more than 0).",
    )

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
    re-writes the datasets without generating or scoring anything again. They decide which
    responses the SFT dataset keeps (preference pairs use ``scorer.min_margin``)."""

    min_score: float | None = Field(
        None,
        description="Lowest weighted reward score an SFT response may have; null: no minimum. Needs "
                    "`scorer.reward_model`.",
    )
    min_attributes: dict[str, float] = Field(
        default_factory=dict,
        description="Lowest score per reward-model attribute, e.g. `{correctness: 2.0}`; a response without the "
                    "attribute is dropped. Needs `scorer.reward_model`.",
    )
    max_attributes: dict[str, float] = Field(
        default_factory=dict,
        description="Highest score per reward-model attribute, e.g. `{verbosity: 3.5}`; a response without the "
                    "attribute is dropped. Needs `scorer.reward_model`.",
    )
    require_verified: bool = Field(
        True,
        description="SFT keeps no response that fails its ground truth or verifier (responses with nothing to "
                    "check are kept).",
    )


class DedupSpec(Section):
    """Exact (normalized text) and MinHash near-duplicate removal, on topics and prompts
    before responses are generated and on responses after."""

    enabled: bool = Field(True, description="Remove duplicates; false keeps every text.")
    near_threshold: float = Field(
        0.8, gt=0, le=1,
        description="Two texts are near duplicates when the estimated Jaccard similarity of their character "
                    "shingles reaches this; the first of a group is kept.",
    )
    num_perm: PositiveInt = Field(
        128, description="MinHash functions per signature: more estimate the similarity more precisely, at more cost.",
    )
    shingle_size: PositiveInt = Field(
        5, description="Characters per shingle, taken after normalizing case, whitespace and punctuation.",
    )


class VerifySpec(Section):
    """The code sandbox (``sdg/verifiers.py``): model-written code runs under bubblewrap, with
    seccomp, CPU time, wall time, memory and file-size limits, seeing none of this machine's
    files but the interpreter's, no network and no environment."""

    code_timeout_s: PositiveFloat = Field(
        5.0,
        description="Wall-clock limit, in seconds, for a response's code and its tests (the CPU-time limit is the "
                    "same, rounded up).",
    )
    code_memory_mb: PositiveInt = Field(512, description="Address-space limit of the sandboxed process, in MiB.")
    sandbox: Literal["bubblewrap", "weak"] = Field(
        "bubblewrap",
        description="`bubblewrap`: the code runs under `bwrap` (namespaces of its own: no network, no other "
                    "process; read-only the interpreter and its shared libraries only, a private tmpfs as the "
                    "only writable folder) and a seccomp filter (no exec, fork, socket, ptrace, mount); an `sdg` "
                    "run with code problems fails before generating anything where bwrap is missing or does not "
                    "work (`apt-get install bubblewrap`; unprivileged user namespaces). `weak`: a plain `python -I` "
                    "subprocess with the same limits and an empty environment, which gives up the filesystem "
                    "isolation (the code can read and write every file this user can: keys, the artifact store, "
                    "the recipe's records), seccomp (native code through ctypes can exec programs, fork and call "
                    "any system call) and the process isolation; only an audit hook stops Python-level sockets, "
                    "subprocesses and `os.system`, and the network is cut only where `unshare -rn` works (else "
                    "ctypes, and packages that need it, are refused). For trusted code on a machine without "
                    "bubblewrap.",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and "network_namespace" in data:
            raise ValueError("verify.network_namespace is gone: code now runs under bubblewrap with no network; "
                             "use `sandbox: bubblewrap` (the default) or `sandbox: weak`")
        return data


class SDGSpec(Section):
    """A synthetic-data run: generator, prompt pipelines, responses, scoring, filters."""

    generator: GeneratorSpec = Field(
        description="Required: the model that writes the prompts, the responses and the two-turn follow-ups.",
    )
    open_qa: OpenQASpec | None = Field(
        None,
        description="Open Q&A prompts from topics; null: off. At least one of open_qa, writing, closed_qa, math "
                    "and code must be on.",
    )
    writing: WritingSpec | None = Field(None, description="Writing tasks about topics; null: off.")
    closed_qa: ClosedQASpec | None = Field(None, description="Instructions about documents; null: off.")
    math: ProblemSpec | None = Field(
        None,
        description="Math problems from keywords and given problems (an `answer` is compared with each response's "
                    "final answer); null: off.",
    )
    code: ProblemSpec | None = Field(
        None,
        description="Python problems from keywords and given problems (each response's code runs in the sandbox, "
                    "with the problem's `tests` when it has them); null: off.",
    )
    instruction_following: InstructionFollowingSpec | None = Field(
        None, description="Prompts from the other pipelines with verifiable constraints appended; null: off.",
    )
    two_turn: TwoTurnSpec | None = Field(
        None, description="User / Assistant / User prompts built from the other pipelines' prompts; null: off.",
    )
    responses: ResponsesSpec = Field(ResponsesSpec(), description="How many responses every prompt gets.")
    scorer: ScorerSpec = Field(
        ScorerSpec(), description="The reward model and the judge, and how they rank preference pairs.",
    )
    filter: FilterSpec = Field(FilterSpec(), description="Which responses the SFT dataset keeps.")
    dedup: DedupSpec = Field(
        DedupSpec(), description="Exact and near-duplicate removal of topics, prompts and responses.",
    )
    verify: VerifySpec = Field(VerifySpec(), description="The sandbox that runs the code of responses.")
    formats: list[Literal["jsonl", "parquet"]] = Field(
        default_factory=lambda: ["jsonl", "parquet"], min_length=1,
        description="File formats written for the SFT and preference datasets.",
    )
    seed: int = Field(
        0,
        description="Seeds in-process sampling, MinHash, the choice of base prompts for instruction_following and "
                    "two_turn, and the endpoint's retry jitter.",
    )

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
