"""SDG pieces that need no model: list parsing, verifiers, dedup, record shards, pair
ranking, the judge's agreement rule, and the recipe section's errors (the code sandbox:
tests/test_verifiers.py)."""

from __future__ import annotations

import json
from random import Random

import pytest

from flows.recipe import RecipeError, parse_recipe
from sdg.dedup import dedup
from sdg.parsing import extract_code, final_answer, parse_list, parse_single
from sdg.responses import choose_pair
from sdg.scorers import agreed_winner, combine, parse_verdict
from sdg.shards import RecordShards, record_key
from sdg.spec import NEMOTRON_REWARD_WEIGHTS, SDGSpec
from sdg.verifiers import (
    CONSTRAINTS,
    answer_matches,
    check_constraints,
    make_constraint,
)

# --------------------------------------------------------------------------------------
# Parsing: items come from the text, never from anywhere else
# --------------------------------------------------------------------------------------


def test_parse_list_reads_numbered_bulleted_and_json_lists():
    text = "Sure! Here are some topics:\n1. Rivers of Europe\n2) Volcanoes\n- Ocean currents\n* **Deserts**\nThanks."
    assert parse_list(text) == ["Rivers of Europe", "Volcanoes", "Ocean currents", "Deserts"]
    assert parse_list('Topics: ["Glaciers", "Lakes", "glaciers"]') == ["Glaciers", "Lakes"]  # duplicates dropped
    assert parse_list("1. a topic\n2. another topic\n3. third", limit=2) == ["a topic", "another topic"]


def test_parse_list_never_invents_items():
    assert parse_list("I cannot think of any topics right now.") == []
    assert parse_list("") == []
    # A JSON array whose strings are escaped differently from the text is not trusted:
    assert parse_list('["caf\\u00e9 culture"]') == []
    for text in ["1. Rivers\n2. \n3. Lakes", "- x\n- Mountains and hills", "Question 1: Why is the sky blue?"]:
        assert all(item in text for item in parse_list(text))
    assert parse_list("Question 1: Why is the sky blue?") == ["Why is the sky blue?"]


def test_parse_single_strips_labels_only():
    assert parse_single('Revised question: "How do rivers form deltas?"') == "How do rivers form deltas?"
    assert parse_single("  \n ") == ""
    assert parse_single("What is 2+2?") == "What is 2+2?"


def test_final_answer_and_code_extraction():
    assert final_answer("so x = 4, and the total is \\boxed{12}.") == "12"
    assert final_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert final_answer("Step 1 ... Answer: $1,200.") == "$1,200"
    assert final_answer("It is 3 and then 7") == "7"
    assert final_answer("no numbers here") is None
    assert final_answer("so \\boxed{\\frac{\\sqrt{2}}{2}} at last") == "\\frac{\\sqrt{2}}{2}"  # nested braces
    assert final_answer("Answer: \\frac{3}{4}.") == "\\frac{3}{4}"
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\ndone") == "def f():\n    return 1"
    assert extract_code("print(1)") == "print(1)"


# --------------------------------------------------------------------------------------
# Verifiers on hand-written cases
# --------------------------------------------------------------------------------------

CONSTRAINT_CASES = [  # (constraint, response that satisfies it, response that does not)
    ({"kind": "min_words", "n": 5}, "one two three four five", "one two three"),
    ({"kind": "max_words", "n": 3}, "short answer", "this answer is far too long"),
    ({"kind": "paragraphs", "n": 2}, "First part.\n\nSecond part.", "Only one paragraph here."),
    ({"kind": "keywords", "keywords": ["river", "delta"]}, "A River ends in a delta.", "A river ends in the sea."),
    ({"kind": "no_commas"}, "No commas at all here.", "Well, there is one."),
    ({"kind": "lowercase"}, "all lower case here", "Not all lower case"),
    ({"kind": "uppercase"}, "ALL CAPS, 100%", "Mostly CAPS but not all"),
    ({"kind": "end_phrase", "phrase": "Is there anything else I can help with?"},
     "Done. Is there anything else I can help with?", "Is there anything else I can help with? Yes."),
    ({"kind": "quotation"}, '"The whole thing is quoted."', 'The "middle" is quoted.'),
    ({"kind": "bullets", "n": 2}, "* one\n* two", "* one\n* two\n* three"),
    ({"kind": "title"}, "<<My Poem>>\nRoses are red.", "My Poem\nRoses are red."),
    ({"kind": "json"}, '```json\n{"a": 1}\n```', "{'a': 1}"),
]


@pytest.mark.parametrize("constraint,good,bad", CONSTRAINT_CASES, ids=[c[0]["kind"] for c in CONSTRAINT_CASES])
def test_constraint_checks(constraint, good, bad):
    kind = constraint["kind"]
    assert check_constraints(good, [constraint]) == {kind: True}
    assert check_constraints(bad, [constraint]) == {kind: False}


def test_every_constraint_kind_is_worded_and_checked():
    assert {c[0]["kind"] for c in CONSTRAINT_CASES} == set(CONSTRAINTS)
    rng = Random(0)
    for kind in CONSTRAINTS:
        c = make_constraint(kind, rng, "Describe the rivers and mountains of Europe")
        assert c["kind"] == kind and c["instruction"].endswith(".")
        json.dumps(c)  # stored in prompt records
    assert make_constraint("keywords", Random(1), "Describe rivers and mountains")["keywords"][0] in (
        "describe", "rivers", "mountains")


@pytest.mark.parametrize("response,truth,expected", [
    ("The answer is \\boxed{72}.", "72", True),
    ("She has 48 + 24 clips.\n#### 72", "Natalia sold 48/2 = 24 clips in May.\n#### 72", True),
    ("Answer: $1,200.00", "1200", True),
    ("So the probability is \\boxed{3/4}", "0.75", True),
    ("Answer: 50%", "50", True),
    ("The answer is \\boxed{71}.", "72", False),
    ("I am not sure.", "72", False),
    ("\\boxed{x^2}", "x^2", True),
    ("\\boxed{x^3}", "x^2", False),
])
def test_math_answers(response, truth, expected):
    assert answer_matches(response, truth) is expected


# Equal answers written differently: normalized string matching called these wrong (and so
# flipped preference pairs); math-verify compares the mathematical objects.
EQUAL_BUT_WRITTEN_DIFFERENTLY = [
    ("The answer is \\boxed{\\frac{3}{4}}.", "0.75"),  # LaTeX fraction vs decimal
    ("The answer is \\boxed{0.75}.", "\\frac{3}{4}"),
    ("So \\boxed{\\dfrac{3}{4}}", "3/4"),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}"),  # nested braces; equivalent expressions
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
    ("\\boxed{2(x+1)}", "2x+2"),
    ("\\boxed{\\{3, 2, 1\\}}", "\\{1,2,3\\}"),  # sets in any order
    ("\\boxed{[0, \\frac{1}{2})}", "[0,0.5)"),  # intervals
    ("\\boxed{x = 3}", "3"),
    ("Answer: \\frac{1}{2}", "0.5"),  # an answer line in LaTeX: not its first digit
    ("\\boxed{5\\%}", "0.05"),
]
STILL_WRONG = [
    ("\\boxed{\\frac{1}{3}}", "0.33"),  # a rounded decimal is not the fraction
    ("\\boxed{[1, 2)}", "(1,2)"),  # closed vs open end
    ("\\boxed{\\{1, 2\\}}", "\\{1,2,3\\}"),
    ("\\boxed{x^3}", "x^2"),
    ("\\boxed{2x+1}", "2(x+1)"),
    ("\\boxed{3.14159}", "\\pi"),
    ("The answer is \\boxed{71}.", "72"),
    ("There is no answer here.", "\\frac{3}{4}"),
]


@pytest.mark.parametrize("response,truth", EQUAL_BUT_WRITTEN_DIFFERENTLY)
def test_math_verify_accepts_what_string_matching_rejected(response, truth):
    from sdg.parsing import normalize_answer

    assert normalize_answer(final_answer(response)) != normalize_answer(truth)  # the old rule: "wrong"
    assert answer_matches(response, truth) is True


@pytest.mark.parametrize("response,truth", STILL_WRONG)
def test_math_verify_still_rejects_wrong_answers(response, truth):
    assert answer_matches(response, truth) is False


def test_math_answers_are_checked_off_the_main_thread():
    """math-verify's default timeouts use SIGALRM, which only the main thread may set: a stage
    run in a worker thread (Prefect, a thread pool) checks answers without them."""
    from concurrent.futures import ThreadPoolExecutor

    from sdg import verifiers

    cases = EQUAL_BUT_WRITTEN_DIFFERENTLY[:3] + STILL_WRONG[:3]
    with ThreadPoolExecutor(2) as pool:
        verdicts = list(pool.map(lambda c: answer_matches(*c), cases))
        assert pool.submit(verifiers._timeout_s).result() is None
    assert verdicts == [True] * 3 + [False] * 3
    assert verifiers._timeout_s() == verifiers.MATH_VERIFY_TIMEOUT_S  # here, on the main thread


def test_a_missing_math_verify_is_named(monkeypatch):
    import sys


    monkeypatch.setitem(sys.modules, "math_verify", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"math-verify\[antlr4_13_2\]"):
        answer_matches("\\boxed{1}", "1")


# --------------------------------------------------------------------------------------
# Dedup
# --------------------------------------------------------------------------------------


def test_exact_and_near_duplicates_are_removed_keeping_the_first():
    texts = [
        "How do rivers form deltas over thousands of years?",
        "how do rivers form deltas over thousands of years",  # exact after normalization
        "How do rivers form their deltas over thousands of years?",  # near duplicate
        "What is the largest prime number below one hundred?",
        "Explain photosynthesis to a ten year old child.",
        "Rivers",
        "rivers!",
    ]
    assert dedup(texts, near_threshold=0.7) == [0, 3, 4, 5]
    assert dedup(texts, near_threshold=None) == [0, 2, 3, 4, 5]  # exact only


def test_minhash_estimates_jaccard():
    from sdg.dedup import MinHasher, shingles

    a = "the quick brown fox jumps over the lazy dog near the river bank"
    b = "the quick brown fox jumps over the lazy cat near the river bank"
    true = len(shingles(a, 5) & shingles(b, 5)) / len(shingles(a, 5) | shingles(b, 5))
    hasher = MinHasher(num_perm=256, seed=1)
    estimate = float((hasher.signature(a) == hasher.signature(b)).mean())
    assert abs(estimate - true) < 0.1


# --------------------------------------------------------------------------------------
# Record shards: per-record resume
# --------------------------------------------------------------------------------------


def test_shards_skip_a_torn_line_and_never_duplicate(tmp_path):
    shards = RecordShards(tmp_path / "responses")
    shards.append("a", "first")
    shards.append("b", {"text": "second"})
    shards.append("a", "ignored: a key is written once")
    shards.close()
    [part] = list((tmp_path / "responses").glob("part-*.jsonl"))
    with open(part, "a") as f:
        f.write('{"key": "c", "value": "torn by a ki')  # a kill in the middle of a write
    again = RecordShards(tmp_path / "responses")
    assert again.load() == {"a": "first", "b": {"text": "second"}}
    again.append("c", "regenerated")
    again.close()
    assert len(list((tmp_path / "responses").glob("part-*.jsonl"))) == 2  # a new run writes its own part
    assert RecordShards(tmp_path / "responses").load()["c"] == "regenerated"
    assert record_key("x", {"b": 1, "a": 2}) == record_key("x", {"a": 2, "b": 1})


# --------------------------------------------------------------------------------------
# Ranking pairs and the judge's agreement rule
# --------------------------------------------------------------------------------------


def _response(key, text, passed=None, by="ground_truth", scores=None):
    verdict = None if passed is None else {"passed": passed, "by": by}
    return {"key": key, "text": text, "verdict": verdict, "scores": scores}


def test_ground_truth_outranks_the_reward_model():
    w = NEMOTRON_REWARD_WEIGHTS
    high = {a: 4.0 for a in w}
    low = {a: 0.0 for a in w}
    wrong_but_liked = _response("r1", "\\boxed{71}", passed=False, scores=high)
    right_but_disliked = _response("r2", "\\boxed{72}", passed=True, scores=low)
    pair = choose_pair([wrong_but_liked, right_but_disliked], "reward_model", w)
    assert pair["chosen"]["key"] == "r2" and pair["rejected"]["key"] == "r1" and pair["ranked_by"] == "ground_truth"
    # Nothing correct: no pair, whatever the scores say.
    assert choose_pair([wrong_but_liked, _response("r3", "\\boxed{70}", passed=False, scores=low)],
                       "reward_model", w) is None


def test_reward_model_ranks_when_nothing_checks_and_respects_the_margin():
    w = {"helpfulness": 1.0}
    a = _response("a", "good", scores={"helpfulness": 3.0})
    b = _response("b", "bad", scores={"helpfulness": 1.0})
    pair = choose_pair([b, a], "reward_model", w)
    assert (pair["chosen"]["key"], pair["rejected"]["key"], pair["ranked_by"]) == ("a", "b", "reward_model")
    assert choose_pair([b, a], "reward_model", w, min_margin=2.5) is None
    assert choose_pair([a, _response("c", "tie", scores={"helpfulness": 3.0})], "reward_model", w) is None
    assert choose_pair([a, b], "judge", w)["judge"] == (a, b)
    assert choose_pair([a], "reward_model", w) is None


def test_judge_pairs_are_kept_only_when_both_orders_agree():
    assert parse_verdict("After comparing, [[B]] is better.") == "B"
    assert parse_verdict("A") == "A"
    assert parse_verdict("[[A]] or maybe [[B]]") is None
    assert parse_verdict("both are fine") is None
    # (x, y) asked as A=x, B=y, then as A=y, B=x:
    assert agreed_winner("A", "B") == 0  # x both times
    assert agreed_winner("B", "A") == 1  # y both times
    assert agreed_winner("A", "A") is None  # always the first position: position bias, dropped
    assert agreed_winner("B", "B") is None
    assert agreed_winner(None, "A") is None


def test_combine_uses_the_published_weights():
    scores = {"helpfulness": 3.0, "correctness": 3.0, "coherence": 4.0, "complexity": 2.0, "verbosity": 2.0}
    assert combine(scores, NEMOTRON_REWARD_WEIGHTS) == pytest.approx(
        0.3 * 3 + 0.74 * 3 + 0.46 * 4 + 0.47 * 2 - 0.33 * 2)


# --------------------------------------------------------------------------------------
# The recipe section
# --------------------------------------------------------------------------------------


def test_bad_sdg_sections_name_the_field(tmp_path):
    with pytest.raises(RecipeError) as e:
        parse_recipe({"name": "x", "sdg": {"generator": {"model": str(tmp_path / "nowhere")},
                                          "open_qa": {"topics": []}, "filter": {"min_score": 1.0},
                                          "instruction_following": {"constraints": ["rhyme"]}}})
    problems = dict(e.value.problems)
    assert "no checkpoint" in problems["sdg.generator.model"]
    assert "seed topics" in problems["sdg.open_qa.topics"]
    assert any(p.startswith("sdg.instruction_following.constraints") for p in problems)
    with pytest.raises(RecipeError) as e:
        parse_recipe({"name": "x", "sdg": {"generator": {"endpoint": "127.0.0.1:8000"}, "open_qa": {"topics": ["a"]}}})
    assert "http" in dict(e.value.problems)["sdg.generator.endpoint"]
    with pytest.raises(RecipeError) as e:
        parse_recipe({"name": "x", "sdg": {"generator": {"model": "teacher"}, "writing": {}}})
    assert "enable open_qa" in dict(e.value.problems)["sdg.writing.topics"]
    bad_problems = tmp_path / "math.jsonl"
    bad_problems.write_text('{"question": "1+1?", "answer": "2"}\n{"answer": "3"}\nnot json\n')
    with pytest.raises(RecipeError) as e:
        parse_recipe({"name": "x", "sdg": {"generator": {"model": "teacher"},
                                          "math": {"problems_file": str(bad_problems)}}})
    assert set(dict(e.value.problems)) == {"sdg.math.problems_file:2", "sdg.math.problems_file:3"}
    with pytest.raises(RecipeError) as e:
        parse_recipe({"name": "x", "sdg": {"generator": {"model": "teacher"}, "math": {"keywords": ["sums"]},
                                          "filter": {"min_score": 1}}})
    assert "reward_model" in dict(e.value.problems)["sdg.filter.min_score"]
    ok = SDGSpec.model_validate({"generator": {"endpoint": "http://127.0.0.1:8000/v1"}, "open_qa": {"topics": ["a"]}})
    assert ok.scorer.weights == NEMOTRON_REWARD_WEIGHTS and ok.checkpoints() == {}


# --------------------------------------------------------------------------------------
# Prompt pipelines, with a scripted generator
# --------------------------------------------------------------------------------------


class ScriptedAsk:
    """``ask(step, prompts)`` answering from a rule; records what each step was asked."""

    def __init__(self, rule):
        self.rule, self.asked = rule, {}

    def __call__(self, step, prompts, samples=None, who="generator"):
        self.asked.setdefault(step, []).extend(m[-1]["content"] for m in prompts)
        return [self.rule(step, m[-1]["content"]) for m in prompts]


def test_topics_are_deduplicated_before_any_question_is_asked():
    from sdg import prompts as P
    from sdg.spec import OpenQASpec

    def rule(step, text):
        if step == "macro_topics":
            return "1. Oceans\n2. oceans.\n3. Deserts"
        return "1. Ocean currents\n2. Ocean currents!\n3. Coral reefs"  # subtopics, with a duplicate

    ask = ScriptedAsk(rule)
    spec = OpenQASpec(topics=["Rivers", "rivers"], generate_topics=3, subtopics_per_topic=3)
    found = P.topics(spec, ask, lambda texts: dedup(texts, 0.8))
    assert found == ["Rivers", "Oceans", "Deserts", "Ocean currents", "Coral reefs"]
    assert len(ask.asked["subtopics"]) == 3  # Rivers, Oceans, Deserts: no duplicate was expanded


def test_open_questions_are_parsed_then_revised_without_inventing():
    from sdg import prompts as P
    from sdg.spec import OpenQASpec

    def rule(step, text):
        if step == "questions":
            return "Here you go:\n1. How do rivers form?\n2. Why do rivers meander?" if "Rivers" in text else "no idea"
        return 'Revised question: "' + text.split("Question: ")[1].split("\n")[0] + ' Explain with an example."'

    ask = ScriptedAsk(rule)
    records = P.open_qa_prompts(OpenQASpec(topics=["Rivers"], questions_per_topic=2), ["Rivers", "Clouds"], ask)
    assert [r["messages"][0]["content"] for r in records] == [
        "How do rivers form? Explain with an example.", "Why do rivers meander? Explain with an example."]
    assert {r["meta"]["topic"] for r in records} == {"Rivers"}  # "no idea" gave no question for Clouds
    assert len({r["id"] for r in records}) == 2


def test_instruction_following_and_two_turn_prompts():
    from sdg import prompts as P
    from sdg.spec import InstructionFollowingSpec, TwoTurnSpec

    base = [P.prompt_record("open_qa", P.user(f"Describe river number {i}"), {}) for i in range(5)]
    base.append(P.prompt_record("math", P.user("What is 2+2?"), {}, answer="4"))
    records = P.instruction_following_prompts(InstructionFollowingSpec(prompts=3, constraints=["no_commas"]), base, 0)
    assert len(records) == 3 and all(r["constraints"][0]["kind"] == "no_commas" for r in records)
    assert all(r["messages"][0]["content"].endswith("Do not use any commas in your response.") for r in records)
    assert all(r["meta"]["base_kind"] == "open_qa" for r in records)  # general prompts, not math with an answer
    assert records == P.instruction_following_prompts(InstructionFollowingSpec(prompts=3, constraints=["no_commas"]),
                                                      list(reversed(base)), 0)  # seeded, order-independent

    ask = ScriptedAsk(lambda step, text: "The river is long." if step == "two_turn_replies" else "How long is it?")
    [two] = P.two_turn_prompts(TwoTurnSpec(prompts=1), base, ask, 0)
    assert [m["role"] for m in two["messages"]] == ["user", "assistant", "user"]
    assert two["messages"][1]["content"] == "The river is long." and two["messages"][2]["content"] == "How long is it?"
    assert "ASSISTANT: The river is long." in ask.asked["two_turn_follow_ups"][0]
