"""SDG with real models: a tiny Nemotron-H generator run in-process, a tiny reward model,
the whole stage end to end, cached reruns, kill-and-resume, the judge, and ``factory sdg``.

The generator is an untrained micro Nemotron-H with a BPE tokenizer (its text is noise,
the mechanics are real); ``factory sdg`` uses the recipe's own pretrained micro teacher.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from model.contract import StageContext
from model.data import iter_documents, open_source
from model.digests import folder_digest
from model.spec import DataSpec, ModelSpec
from sdg import sdg_stage
from sdg.backends import ChatRequest, LocalGenerator
from sdg.output import render_conversation
from sdg.pipeline import Run, rank_pairs
from sdg.scorers import HELPSTEER2_ATTRIBUTES, RewardModel, combine, init_reward_head
from sdg.shards import RecordStore
from sdg.spec import NEMOTRON_REWARD_WEIGHTS, SDGSpec
from store.local import LocalStore

from .conftest import REPO, recipe_dict, run_cli, write_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained micro Nemotron-H with a 512-token BPE (which carries the chat template), made once per session."""
    folder = tmp_path_factory.getbasetemp() / "sdg-tiny-generator"
    if (folder / "model.safetensors").is_file():
        return folder
    from model.architectures import build_model_config, get_family
    from model.tokenizer import train_bpe

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tokenizer = train_bpe((p.read_text() for p in sorted(stdlib.glob("[a-c]*.py"))[:15]), 512)
    torch.manual_seed(0)
    model = get_family("nemotron_h").model_class(build_model_config(ModelSpec(preset="micro"), tokenizer))
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return folder


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def reward_dir(generator_dir, tmp_path_factory) -> Path:
    return init_reward_head(generator_dir, tmp_path_factory.mktemp("reward-model"), seed=1)


@pytest.fixture(scope="module")
def problem_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("problems")
    math = folder / "math.jsonl"
    math.write_text("\n".join(json.dumps(row) for row in [
        {"question": "Natalia sold 48 clips in April and half as many in May. How many in total?", "answer": "72"},
        {"question": "What is 7 times 8?", "answer": "56"}]) + "\n")
    code = folder / "code.jsonl"
    code.write_text(json.dumps({"question": "Write a function add(a, b) that returns a + b.",
                                "tests": "assert add(2, 3) == 5"}) + "\n")
    return {"math": math, "code": code}


def small_spec(generator_dir: Path, reward_dir: Path | None = None, **sections) -> SDGSpec:
    values = {
        "generator": {"model": str(generator_dir), "max_new_tokens": 12, "temperature": 1.0, "top_p": 0.95,
                      "batch_size": 8},
        "open_qa": {"topics": ["rivers", "prime numbers"], "subtopics_per_topic": 2, "questions_per_topic": 1},
        "responses": {"per_prompt": 2},
    }
    if reward_dir is not None:
        values["scorer"] = {"reward_model": str(reward_dir)}
    return SDGSpec.model_validate(values | sections)


# --------------------------------------------------------------------------------------
# Backends and scorers
# --------------------------------------------------------------------------------------


def test_batched_generation_matches_one_prompt_at_a_time(generator_dir):
    """Left padding must not change what a prompt generates (greedy, so comparable)."""
    prompts = ["hi", "def main():\n    return the value of x plus y", "import os",
               "a much longer prompt about the rivers and mountains of Europe and their history"]
    requests = [ChatRequest(messages=[{"role": "user", "content": p}], max_new_tokens=10, temperature=0)
                for p in prompts]
    generator = LocalGenerator(generator_dir, batch_size=4)
    batched = dict(generator.generate_iter(requests))
    generator.batch_size = 1
    single = dict(generator.generate_iter(requests))
    assert batched == single and len(batched) == 4
    assert generator.identity == f"checkpoint:{folder_digest(generator_dir)}"


def test_a_sampled_request_generates_the_same_text_in_any_batch(generator_dir):
    """Sampling draws from one random stream per request (seeded by the request), so what a
    request generates does not depend on its batch: a resumed run batches only the missing ones."""
    prompts = ["hi", "import os", "def main():\n    return x", "rivers and mountains of Europe", "tell me"]
    requests = [ChatRequest(messages=[{"role": "user", "content": p}], max_new_tokens=10, temperature=1.0,
                            top_p=0.9, sample=s) for p in prompts for s in range(2)]
    generator = LocalGenerator(generator_dir, batch_size=8)
    together = dict(generator.generate_iter(requests))
    generator.batch_size = 3
    regrouped = dict(generator.generate_iter(requests[::-1]))
    assert [together[i] for i in range(len(requests))] == [regrouped[len(requests) - 1 - i] for i in range(len(requests))]
    assert together[0] != together[1] or together[2] != together[3]  # samples of one prompt differ
    assert dict(LocalGenerator(generator_dir, batch_size=8, seed=1).generate_iter(requests)) != together


def test_reward_model_scores_each_attribute_from_the_last_token(generator_dir, reward_dir):
    rm = RewardModel(reward_dir, batch_size=2)
    assert rm.attributes == list(HELPSTEER2_ATTRIBUTES)
    conversations = [[{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
                     [{"role": "user", "content": "Name a river."},
                      {"role": "assistant", "content": "The Danube flows through ten countries."}]]
    batched = rm.score(conversations)
    alone = [rm.score([c])[0] for c in conversations]
    for a, b in zip(batched, alone, strict=True):  # right padding does not leak into the last token
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)
    # The head applied by hand to the base model's last hidden state:
    text = render_conversation(conversations[0])
    ids = rm.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        hidden = rm.model.base_model(**ids).last_hidden_state[0, -1]
        expected = rm.head(hidden).tolist()
    assert [batched[0][a] for a in rm.attributes] == pytest.approx(expected, abs=1e-4)
    assert batched[0] != batched[1]


def test_sequence_classification_reward_models_load(tmp_path, generator_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0,
                         id2label={0: "helpfulness", 1: "correctness", 2: "verbosity"})
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(generator_dir).save_pretrained(tmp_path)
    rm = RewardModel(tmp_path)
    [scores] = rm.score([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]])
    assert list(scores) == ["helpfulness", "correctness", "verbosity"]
    with pytest.raises(ValueError, match="not a reward model"):
        RewardModel(generator_dir)


class ScriptedJudge:
    """A judge whose verdict is a rule over the two responses it is shown."""

    identity = "endpoint:scripted"

    def __init__(self, rule):
        self.rule, self.calls = rule, 0

    def generate_iter(self, requests):
        for i, request in enumerate(requests):
            self.calls += 1
            text = request.messages[0]["content"]
            a = text.split("[Response A]\n")[1].split("\n\n[Response B]")[0]
            b = text.split("[Response B]\n")[1].split("\n\nAnswer with")[0]
            yield i, self.rule(a, b)

    def close(self):
        pass


def test_judge_keeps_a_pair_only_when_both_orders_agree(tmp_path, generator_dir):
    spec = small_spec(generator_dir, scorer={"judge": {"endpoint": "http://judge.invalid/v1", "endpoint_model": "j"}})
    prompts = [{"id": f"p{i}", "kind": "open_qa", "messages": [{"role": "user", "content": f"question {i}"}], "meta": {}}
               for i in range(3)]
    by_prompt = {p["id"]: [{"key": f"{p['id']}-short", "text": "short", "verdict": None, "scores": None},
                           {"key": f"{p['id']}-long", "text": "a much longer answer", "verdict": None, "scores": None}]
                 for p in prompts}

    def judged(rule, records):
        run = Run(spec, {}, {"generator": "g", "judge": "endpoint:http://judge.invalid/v1#j"}, records, None)
        run._backends["judge"] = judge = ScriptedJudge(rule)
        pairs = rank_pairs(spec, run, prompts, by_prompt)
        return pairs, run.stats["pairs"], judge.calls

    # Always the first position: every verdict flips with the order, so every pair is dropped.
    pairs, stats, calls = judged(lambda a, b: "[[A]]", RecordStore(tmp_path / "biased"))
    assert pairs == [] and stats == {"judge_disagreed": 3} and calls == 6
    # Prefers the longer response wherever it stands: kept, longer chosen.
    pairs, stats, calls = judged(lambda a, b: "[[A]]" if len(a) > len(b) else "[[B]]", RecordStore(tmp_path / "fair"))
    assert stats == {"by_judge": 3} and all(p["chosen"]["text"] == "a much longer answer" for p in pairs)
    # Verdicts are records too: asking again asks the judge nothing.
    _, _, calls = judged(lambda a, b: "[[B]]", RecordStore(tmp_path / "fair"))
    assert calls == 0


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


def full_spec(generator_dir, reward_dir, problem_files, corpus_dir) -> SDGSpec:
    return small_spec(
        generator_dir, reward_dir,
        writing={"kinds": ["poem"]},
        closed_qa={"data": {"source": str(corpus_dir)}, "max_documents": 2, "max_chars": 300,
                   "instructions_per_document": 1},
        math={"keywords": ["fractions"], "problems_file": str(problem_files["math"])},
        code={"problems_file": str(problem_files["code"])},
        instruction_following={"prompts": 3},
        two_turn={"prompts": 2},
    )


@pytest.mark.slow  # the sandbox runs the code problems' tests
def test_sdg_end_to_end_gives_scored_datasets_usable_as_a_data_source(tmp_path, generator_dir, reward_dir,
                                                                      problem_files, corpus_dir, monkeypatch):
    store = LocalStore(tmp_path / "store")
    spec = full_spec(generator_dir, reward_dir, problem_files, corpus_dir)
    ref = sdg_stage.run(spec, {}, store, StageContext("e2e"))
    assert ref.kind == "sdg_dataset" and store.verify(ref.uri, ref.digest, deep=True)
    out = Path(ref.uri)
    sft = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (out / "preference.jsonl").read_text().splitlines()]
    stats = ref.metadata["stats"]
    assert sft and len(sft) == ref.metadata["sft_rows"] and len(pairs) == ref.metadata["preference_rows"]
    assert set(stats["prompts_by_kind"]) == {"open_qa", "writing", "closed_qa", "math", "code",
                                             "instruction_following", "two_turn"}
    for row in sft:
        assert set(row["scores"]) == set(HELPSTEER2_ATTRIBUTES)
        assert row["score"] == pytest.approx(combine(row["scores"], NEMOTRON_REWARD_WEIGHTS))
        assert row["text"] == render_conversation(row["messages"]) and row["messages"][-1]["content"] == row["response"]
        checked = row["kind"] in ("code", "instruction_following") or row["meta"].get("given")
        assert row["verified"] is (True if checked else None)  # failures never reach SFT (require_verified)
    assert len({r["id"] for r in sft}) == len(sft) and len({(r["prompt_id"], r["sample"]) for r in sft}) == len(sft)
    assert stats["responses"]["generated"] == 2 * stats["prompts"]["kept"]
    assert stats["verdicts"]["generated"] == 2 * (2 + 1 + stats["prompts_by_kind"]["instruction_following"])
    for pair in pairs:
        assert pair["ranked_by"] in ("ground_truth", "verifier", "reward_model")
        assert pair["chosen_response"] != pair["rejected_response"]
        if pair["ranked_by"] == "reward_model":
            assert pair["chosen_reward"] > pair["rejected_reward"]
    # The two-turn prompts are User / Assistant / User.
    two_turn = [r for r in sft if r["kind"] == "two_turn"]
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant", "user", "assistant"] for r in two_turn)

    # Both formats are a factory data source as they are (text_field: text).
    for name in ("sft.jsonl", "sft.parquet"):
        data = DataSpec(source=str(out / name), text_field="text")
        texts = [d.text for d in iter_documents(data, open_source(data))]
        assert sorted(texts) == sorted(r["text"] for r in sft)
    assert len(list(iter_documents(DataSpec(source=str(out / "preference.parquet")),
                                   open_source(DataSpec(source=str(out / "preference.parquet")))))) == len(pairs)

    # Again: the stored result, at once.
    start = time.monotonic()
    assert sdg_stage.run(spec, {}, store, StageContext("e2e")) == ref
    assert time.monotonic() - start < 2

    # New thresholds: new datasets from the stored scores; nothing generated, scored, or even loaded.
    import sdg.pipeline

    monkeypatch.setattr(sdg.pipeline, "open_generator", lambda *a, **k: pytest.fail("generator loaded"))
    monkeypatch.setattr(sdg.pipeline, "RewardModel", lambda *a, **k: pytest.fail("reward model loaded"))
    median = sorted(r["scores"]["correctness"] for r in sft)[len(sft) // 2]
    stricter = spec.model_copy(update={"filter": spec.filter.model_copy(update={"min_attributes": {"correctness": median}})})
    again = sdg_stage.run(stricter, {}, store, StageContext("e2e"))
    assert again.uri != ref.uri
    assert all(s.get("generated", 0) == 0 for s in again.metadata["stats"].values())
    kept = [json.loads(line) for line in (Path(again.uri) / "sft.jsonl").read_text().splitlines()]
    assert kept and len(kept) < len(sft) and all(r["scores"]["correctness"] >= median for r in kept)
    assert {r["id"] for r in kept} <= {r["id"] for r in sft}


KILL_SCRIPT = """
import json, sys
from store.local import LocalStore
from sdg.spec import SDGSpec
from model.contract import StageContext
from sdg import sdg_stage
spec = SDGSpec.model_validate_json(open(sys.argv[1]).read())
ref = sdg_stage.run(spec, {}, LocalStore(sys.argv[2]), StageContext("resume"))
print(json.dumps(ref.metadata["stats"]))
"""


def _complete_keys(folder: Path) -> set[str]:
    keys = set()
    for part in folder.glob("part-*.jsonl"):
        for line in part.read_text().splitlines():
            try:
                keys.add(json.loads(line)["key"])
            except (json.JSONDecodeError, KeyError):
                pass
    return keys


@pytest.mark.slow  # an SDG subprocess, killed
def test_a_killed_run_resumes_generating_only_the_missing_records(tmp_path, generator_dir):
    spec = small_spec(generator_dir, generator={"model": str(generator_dir), "max_new_tokens": 16,
                                                "temperature": 1.0, "batch_size": 2},
                      writing={"kinds": ["poem", "essay", "story", "letter"]}, responses={"per_prompt": 3})
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    store_dir = tmp_path / "store"
    responses_dir = store_dir / "sdg" / "resume" / "records" / "responses"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(spec_file), str(store_dir)], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while len(_complete_keys(responses_dir)) < 3:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no responses within 180 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = _complete_keys(responses_dir)
    earlier_steps = {p.name for p in (store_dir / "sdg" / "resume" / "records").iterdir()} - {"responses"}

    ref = sdg_stage.run(spec, {}, LocalStore(store_dir), StageContext("resume"))
    stats = ref.metadata["stats"]
    total = stats["responses"]["requested"]
    assert 3 <= len(done_before) < total
    assert stats["responses"]["reused"] == len(done_before)
    assert stats["responses"]["generated"] == total - len(done_before)
    for step in earlier_steps:  # topics, questions, ... finished before the kill: nothing generated again
        assert stats[step]["generated"] == 0, step
    assert _complete_keys(responses_dir) >= done_before and len(_complete_keys(responses_dir)) == total
    rows = [json.loads(line) for line in (Path(ref.uri) / "sft.jsonl").read_text().splitlines()]
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({(r["prompt_id"], r["sample"]) for r in rows}) == len(rows)
    # The datasets equal an uninterrupted run's, byte for byte (batches of 2: the kill split some).
    clean = sdg_stage.run(spec, {}, LocalStore(tmp_path / "clean"), StageContext("resume"))
    for name in ("sft.jsonl", "preference.jsonl", "sft.parquet", "preference.parquet"):
        assert (Path(ref.uri) / name).read_bytes() == (Path(clean.uri) / name).read_bytes(), name


def test_factory_sdg_runs_the_recipe_with_its_tiny_teacher(tmp_path, corpus_dir, capsys, monkeypatch):
    """``generator.model: teacher``: the recipe pretrains its micro teacher, which then generates."""
    monkeypatch.setenv("FACTORY_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    sdg_section = {"generator": {"model": "teacher", "max_new_tokens": 12, "temperature": 1.0},
                   "open_qa": {"topics": ["json parsing", "file paths"], "subtopics_per_topic": 0,
                               "questions_per_topic": 1, "revise": False},
                   "instruction_following": {"prompts": 2, "constraints": ["no_commas", "lowercase"]}}
    recipe = write_recipe(tmp_path / "sdg.yaml", recipe_dict(corpus_dir, name="sdg-micro", sdg=sdg_section))
    code, out, err = run_cli("validate", str(recipe), capsys=capsys)
    assert code == 0 and "sdg  generator teacher; pipelines open_qa, instruction_following" in out
    code, out, err = run_cli("sdg", str(recipe), capsys=capsys)
    assert code == 0, err
    uri = out.strip().splitlines()[-1]
    rows = [json.loads(line) for line in (Path(uri) / "sft.jsonl").read_text().splitlines()]
    assert rows and all(r["scores"] is None for r in rows)  # no reward model in this recipe
    assert "SFT rows" in out
    teacher = next((tmp_path / "artifacts" / "pretrain").iterdir()) / "model"
    assert all(r["generator"] == f"checkpoint:{json.loads((teacher / 'manifest.json').read_text())['digest']}"
               for r in rows)
    code, out, err = run_cli("sdg", str(write_recipe(tmp_path / "none.yaml", recipe_dict(corpus_dir, name="x"))),
                             capsys=capsys)
    assert code == 2 and "sdg: the recipe has no sdg section" in err


def test_sdg_output_is_logged_to_mlflow_as_datasets_with_lineage(tmp_path, generator_dir, reward_dir, monkeypatch):
    from registry import tracking
    from registry.sdg_tracking import OUTPUT_CONTEXT, log_sdg_output

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FACTORY_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    spec = small_spec(generator_dir, reward_dir, open_qa={"topics": ["rivers"], "subtopics_per_topic": 0,
                                                          "questions_per_topic": 1, "revise": False})
    ref = sdg_stage.run(spec, {}, LocalStore(tmp_path / "artifacts"), StageContext("tracked"))
    with tracking.factory_run({"name": "tracked", "sdg": spec.model_dump(mode="json")}) as parent:
        with tracking.stage_run(parent, "sdg", system_metrics=False) as stage:
            log_sdg_output(stage, ref, recipe_digest="r" * 64)
    run = tracking.client().get_run(stage)
    datasets = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(datasets) == {"tracked sft", "tracked preference"}
    sft = datasets["tracked sft"]
    tags = {t.key: t.value for t in sft.tags}
    assert tags["mlflow.data.context"] == OUTPUT_CONTEXT
    assert tags["factory.digest"] == ref.metadata["files"]["sft.parquet"]["sha256"]
    assert tags["factory.sdg.generator"] == f"checkpoint:{folder_digest(generator_dir)}"
    assert tags["factory.sdg.reward_model"] == f"checkpoint:{folder_digest(reward_dir)}"
    assert tags["factory.recipe_digest"] == "r" * 64
    assert json.loads(sft.dataset.source)["uri"] == f"{ref.uri}/sft.parquet"
    assert json.loads(sft.dataset.profile)["num_rows"] == ref.metadata["sft_rows"]
    assert run.data.tags["factory.sdg.digest"] == ref.digest
    assert run.data.metrics["sdg/sft_rows"] == ref.metadata["sft_rows"]


# --------------------------------------------------------------------------------------
# Interruptions do not change the datasets
# --------------------------------------------------------------------------------------


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs in the step (BaseException: no handler catches it)."""


def _interrupt_responses_after(monkeypatch, records: int) -> None:
    """The ``responses`` step stops after ``records`` results were kept, as a kill would leave it."""
    ask = Run.ask

    def interrupted(self, step, prompts, samples=None, who="generator"):
        if step == "responses":
            backend = self.backend(who)
            generate_iter = backend.generate_iter

            def cut(requests):
                for n, item in enumerate(generate_iter(requests)):
                    if n == records:
                        raise Killed
                    yield item

            monkeypatch.setattr(backend, "generate_iter", cut)
        return ask(self, step, prompts, samples, who)

    monkeypatch.setattr(Run, "ask", interrupted)


def test_an_interrupted_run_writes_the_datasets_of_an_uninterrupted_one(tmp_path, generator_dir, reward_dir,
                                                                       problem_files, monkeypatch):
    """Killed mid-batch during responses, run again: the same sft and preference files, byte for byte.
    Sampled texts must not depend on which requests happened to share a batch on this run."""
    spec = small_spec(generator_dir, reward_dir, math={"problems_file": str(problem_files["math"])},
                      instruction_following={"prompts": 2, "constraints": ["no_commas", "lowercase"]},
                      responses={"per_prompt": 3})
    clean = sdg_stage.run(spec, {}, LocalStore(tmp_path / "clean"), StageContext("same"))

    store = LocalStore(tmp_path / "interrupted")
    with monkeypatch.context() as patch:
        _interrupt_responses_after(patch, records=5)  # batch_size 8: inside the first batch
        with pytest.raises(Killed):
            sdg_stage.run(spec, {}, store, StageContext("same"))
    parts = list((tmp_path / "interrupted" / "sdg" / "same" / "records" / "responses").glob("part-*.jsonl"))
    assert len(parts) == 1 and len(parts[0].read_text().splitlines()) == 5
    with open(parts[0], "a") as f:
        f.write('{"key": "torn by the kil')  # a record half written when the process died
    resumed = sdg_stage.run(spec, {}, store, StageContext("same"))

    stats = resumed.metadata["stats"]
    assert stats["responses"]["reused"] == 5 and stats["responses"]["generated"] == stats["responses"]["requested"] - 5
    assert clean.metadata["sft_rows"] > 0 and clean.metadata["preference_rows"] > 0
    for name in ("sft.jsonl", "preference.jsonl", "sft.parquet", "preference.parquet"):
        assert (Path(resumed.uri) / name).read_bytes() == (Path(clean.uri) / name).read_bytes(), name
