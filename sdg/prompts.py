"""Prompt pipelines (Nemotron-4 340B, arXiv 2406.11704 section 3.2.1; wording after NeMo
Curator's ``NemotronGenerator`` templates).

    open Q&A   macro topics -> subtopics -> questions -> revised questions
    writing    "write a <kind> about <topic>" tasks -> revised tasks
    closed Q&A documents from any factory data source -> instructions, joined to the document
    math/code  keywords -> problems (plus given problems with answers or tests)
    IF         a prompt from the above + a verifiable constraint (sdg/verifiers.py)
    two-turn   a prompt from the above -> the generator's reply -> the generator, as the
               user, writes a follow-up: User / Assistant / User

Every function takes ``ask(step, prompts, samples=None) -> texts``, which generates only
what the step's shards do not hold yet (sdg/pipeline.py), and returns prompt records:

    {"id": content hash, "kind": "open_qa", "messages": [{"role": "user", "content": ...}],
     "meta": {...}, "answer": ... (math ground truth), "tests": ... (code), "constraints": [...] (IF)}
"""

from __future__ import annotations

from collections.abc import Callable
from random import Random

from model.data import iter_documents, open_source
from sdg.parsing import parse_list, parse_single
from sdg.shards import record_key
from sdg.spec import ClosedQASpec, InstructionFollowingSpec, OpenQASpec, ProblemSpec, TwoTurnSpec, WritingSpec
from sdg.verifiers import make_constraint

Ask = Callable[..., list[str]]

MACRO_TOPICS = ("Can you generate {n} comprehensive topics that encompass various aspects of our daily life, "
                "the world, and science? Your answer should be a list of topics. Make the topics as diverse as "
                "possible. For example:\n1. Food and drinks.\n2. Technology.")
SUBTOPICS = ("Can you generate {n} comprehensive topics that encompass various aspects of {topic}? Your answer "
             "should be a list of topics. Make the topics as diverse as possible.")
QUESTIONS = ("Can you generate {n} questions or requests related to {topic}? The questions and requests should be "
             "as diverse as possible. Your answer should be a list.")
QUESTION = "Can you generate one question or request related to {topic}? Answer with the question only."
REVISE_QUESTION = ("Question: {question}\n\nCan you revise the question above to include more contexts or details? "
                   "The revised question can add some context to the original question, add constraints or "
                   "requirements, or ask for a specific format of the answer. Your answer should only contain "
                   "the revised question.")
WRITING_TASKS = ('Can you generate {n} tasks, each of which requires to create a "{kind}" related to {topic}? Each '
                 "task should be concise and include one or two sentences only. The tasks should be as diverse as "
                 "possible. Your answer should be a list of tasks.")
WRITING_TASK = ('Can you generate one task that requires to create a "{kind}" related to {topic}? The task should '
                "be concise: one or two sentences. Answer with the task only.")
REVISE_TASK = ("TASK: {task}\n\nCan you revise the task above to include more detailed requirements? They can ask "
               "to elaborate on a specific point, to include examples, data points or references, or to follow "
               "a format or style (a word limit, words to include). Your answer should only contain the revised task.")
CLOSED_QA = ("TEXT: {document}\n\nGiven the text above, can you come up with {n} questions or tasks? They can ask "
             "for information in the text; summarize, rephrase or explain the text; write something similar to "
             "the text; or make any other reasonable request about the text. Make them as diverse as possible. "
             "Your answer should be a list.")
CLOSED_QA_ONE = ("TEXT: {document}\n\nGiven the text above, can you come up with one question or task about it? "
                 "Answer with the question or task only.")
CLOSED_QA_PROMPT = "{document}\n\n{instruction}"  # the manual template joining instruction and document
MATH_PROBLEMS = ('Generate {n} mathematics problems which are related to "{keyword}" or can be addressed using '
                 '"{keyword}". Your answer should be a list of problems. Make them as diverse as possible.')
MATH_PROBLEM = ('Generate one mathematics problem which is related to "{keyword}" or can be addressed using '
                '"{keyword}". Answer with the problem only.')
CODE_PROBLEMS = ('Generate {n} Python coding problems related to "{keyword}". These problems should be suitable '
                 'for beginners who just learnt "{keyword}". Your answer should be a list of problems.')
CODE_PROBLEM = ('Generate one Python coding problem related to "{keyword}", suitable for a beginner who just '
                'learnt "{keyword}". Answer with the problem only.')
MATH_SUFFIX = "\n\nPut the final answer within \\boxed{}."
CODE_SUFFIX = "\n\nWrite the solution as one Python code block."
FOLLOW_UP = ("Here is a conversation between a user and an assistant.\n<|The Start of Conversation|>\n"
             "{conversation}\n<|The End of Conversation|>\n\nGiven the conversation above, generate a follow-up "
             "request or question in the tone of the user. Give the question directly, without extraneous words.")


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def prompt_record(kind: str, messages: list[dict], meta: dict | None = None, **extra) -> dict:
    """A prompt with its content hash as id (same text and extras -> same id, on any run)."""
    extra = {k: v for k, v in extra.items() if v is not None}
    return {"id": record_key("prompt", kind, messages, extra), "kind": kind, "messages": messages,
            "meta": meta or {}, **extra}


def items(text: str, n: int) -> list[str]:
    """What a request for ``n`` items yielded: the list items, or the single answer when n == 1."""
    if n == 1:
        single = parse_single(text)
        return [single] if single else []
    return parse_list(text, limit=n)


# --------------------------------------------------------------------------------------
# Open Q&A and writing
# --------------------------------------------------------------------------------------


def topics(spec: OpenQASpec, ask: Ask, dedup: Callable[[list[str]], list[int]]) -> list[str]:
    """Seed topics, generated macro topics, and the subtopics of each, deduplicated before
    any question is generated from them."""
    macro = list(spec.topics)
    if spec.generate_topics:
        [text] = ask("macro_topics", [user(MACRO_TOPICS.format(n=spec.generate_topics))])
        macro += parse_list(text, limit=spec.generate_topics)
    macro = [macro[i] for i in dedup(macro)]
    found = list(macro)
    if spec.subtopics_per_topic:
        texts = ask("subtopics", [user(SUBTOPICS.format(n=spec.subtopics_per_topic, topic=t)) for t in macro])
        for text in texts:
            found += items(text, spec.subtopics_per_topic)
    return [found[i] for i in dedup(found)]


def open_qa_prompts(spec: OpenQASpec, topic_list: list[str], ask: Ask) -> list[dict]:
    n = spec.questions_per_topic
    template = QUESTION if n == 1 else QUESTIONS
    texts = ask("questions", [user(template.format(n=n, topic=t)) for t in topic_list])
    questions = [(topic, q) for topic, text in zip(topic_list, texts, strict=True) for q in items(text, n)]
    if spec.revise and questions:
        revised = ask("revised_questions", [user(REVISE_QUESTION.format(question=q)) for _, q in questions])
        questions = [(topic, parse_single(r) or q) for (topic, q), r in zip(questions, revised, strict=True)]
    return [prompt_record("open_qa", user(q), {"topic": topic}) for topic, q in questions]


def writing_prompts(spec: WritingSpec, topic_list: list[str], ask: Ask) -> list[dict]:
    n = spec.tasks_per_topic
    pairs = [(topic, kind) for topic in (spec.topics or topic_list) for kind in spec.kinds]
    template = WRITING_TASK if n == 1 else WRITING_TASKS
    texts = ask("writing_tasks", [user(template.format(n=n, kind=kind, topic=topic)) for topic, kind in pairs])
    tasks = [(topic, kind, task) for (topic, kind), text in zip(pairs, texts, strict=True) for task in items(text, n)]
    if spec.revise and tasks:
        revised = ask("revised_writing_tasks", [user(REVISE_TASK.format(task=task)) for _, _, task in tasks])
        tasks = [(topic, kind, parse_single(r) or task) for (topic, kind, task), r in zip(tasks, revised, strict=True)]
    return [prompt_record("writing", user(task), {"topic": topic, "form": kind}) for topic, kind, task in tasks]


# --------------------------------------------------------------------------------------
# Closed Q&A over documents
# --------------------------------------------------------------------------------------


def documents(spec: ClosedQASpec) -> list[tuple[str, str]]:
    """(id, text cut to max_chars) of the first ``max_documents`` documents of the source."""
    docs = []
    for doc in iter_documents(spec.data, open_source(spec.data)):
        if text := doc.text.strip()[: spec.max_chars].strip():
            docs.append((doc.id, text))
        if len(docs) >= spec.max_documents:
            break
    if not docs:
        raise ValueError(f"closed_qa: no documents in {spec.data.source}")
    return docs


def closed_qa_prompts(spec: ClosedQASpec, ask: Ask) -> list[dict]:
    n = spec.instructions_per_document
    docs = documents(spec)
    template = CLOSED_QA_ONE if n == 1 else CLOSED_QA
    texts = ask("closed_qa_instructions", [user(template.format(n=n, document=text)) for _, text in docs])
    return [prompt_record("closed_qa", user(CLOSED_QA_PROMPT.format(document=text, instruction=instruction)),
                          {"document": doc_id, "instruction": instruction})
            for (doc_id, text), reply in zip(docs, texts, strict=True) for instruction in items(reply, n)]


# --------------------------------------------------------------------------------------
# Math and code
# --------------------------------------------------------------------------------------


def problem_prompts(kind: str, spec: ProblemSpec, ask: Ask) -> list[dict]:
    """Problems for each keyword (no ground truth: ranked by the scorer, code also by
    whether it runs) and the given problems (math: ``answer``; code: ``tests``)."""
    n, suffix = spec.problems_per_keyword, MATH_SUFFIX if kind == "math" else CODE_SUFFIX
    if kind == "math":
        template = MATH_PROBLEM if n == 1 else MATH_PROBLEMS
    else:
        template = CODE_PROBLEM if n == 1 else CODE_PROBLEMS
    keywords = spec.all_keywords()
    texts = ask(f"{kind}_problems", [user(template.format(n=n, keyword=k)) for k in keywords]) if keywords else []
    records = [prompt_record(kind, user(problem + suffix), {"keyword": keyword})
               for keyword, text in zip(keywords, texts, strict=True) for problem in items(text, n)]
    for row in spec.given_problems():
        truth = {"answer": str(row["answer"])} if kind == "math" and "answer" in row else {}
        if kind == "code" and row.get("tests"):
            truth = {"tests": str(row["tests"])}
        records.append(prompt_record(kind, user(row["question"] + suffix), {"given": True}, **truth))
    return records


# --------------------------------------------------------------------------------------
# Instruction following and two-turn prompts
# --------------------------------------------------------------------------------------


GENERAL_KINDS = ("open_qa", "writing", "closed_qa")  # math and code prompts have their own checks


def _pick(base: list[dict], count: int, rng: Random) -> list[dict]:
    """``count`` general prompts (any prompt when there are none) in a seeded order that
    does not depend on how they were listed."""
    pool = [p for p in base if p["kind"] in GENERAL_KINDS] or list(base)
    pool.sort(key=lambda p: p["id"])
    return [pool[i] for i in rng.sample(range(len(pool)), min(count, len(pool)))]


def instruction_following_prompts(spec: InstructionFollowingSpec, base: list[dict], seed: int) -> list[dict]:
    rng = Random(f"if-{seed}")
    records = []
    for prompt in _pick(base, spec.prompts, rng):
        text = prompt["messages"][0]["content"]
        kinds = rng.sample(spec.constraints, min(spec.constraints_per_prompt, len(spec.constraints)))
        constraints = [make_constraint(kind, rng, text) for kind in kinds]
        instruction = " ".join(c["instruction"] for c in constraints)
        records.append(prompt_record("instruction_following", user(f"{text}\n\n{instruction}"),
                                     {"base": prompt["id"], "base_kind": prompt["kind"]}, constraints=constraints))
    return records


def two_turn_prompts(spec: TwoTurnSpec, base: list[dict], ask: Ask, seed: int) -> list[dict]:
    chosen = _pick(base, spec.prompts, Random(f"two-turn-{seed}"))
    replies = ask("two_turn_replies", [p["messages"] for p in chosen])
    conversations = [p["messages"] + [{"role": "assistant", "content": r}] for p, r in zip(chosen, replies, strict=True)]
    rendered = ["\n\n".join(f"{m['role'].upper()}: {m['content']}" for m in c) for c in conversations]
    follow_ups = ask("two_turn_follow_ups", [user(FOLLOW_UP.format(conversation=r)) for r in rendered])
    return [prompt_record("two_turn", c + user(q), {"base": p["id"]})
            for p, c, f in zip(chosen, conversations, follow_ups, strict=True)
            if (q := parse_single(f)) and c[-1]["content"]]
