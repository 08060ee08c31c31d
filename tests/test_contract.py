"""The stage contract (model/contract.py): every stage checked against it, every result made
through the one helper and found again, a stage written elsewhere plugged in with one line,
plans, and a repository that cites only itself."""

from __future__ import annotations

import inspect
import json
import re
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

import model.contract
from alignment import preference_stage, reward_stage, sft_stage
from alignment.align_stage import dataset_ref
from alignment.spec import PreferenceSpec, RewardSpec, SFTSpec
from compression import distill_stage, importance_stage, prune_stage, search_stage
from compression.prune_stage import PruneSpec
from compression.spec import Budget, DistillSpec, ImportanceSpec, SearchSpace, SearchSpec
from evaluation import evaluate_stage
from evaluation.spec import EvaluateSpec, QualitySpec
from flows.pipeline import STAGES, DirectRunner, PlanRunner, compose, context_for
from flows.recipe import parse_recipe
from model import data_stage, pretrain_stage
from model.contract import ArtifactRef, ArtifactStore, Ref, StageContext, code_version, ref_key
from model.data_stage import DataStageSpec
from model.pretrain_stage import PretrainSpec
from model.spec import DataSpec, ModelSpec, TokenizerSpec, TrainSpec
from sdg import sdg_stage
from sdg.spec import SDGSpec
from store.local import LocalStore

from . import toy_stage
from .conftest import REPO, recipe_dict
from .test_align import write_alignment_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_stage_exports_the_contract():
    names = [stage.NAME for stage in STAGES]
    assert len(set(names)) == len(names), names
    for stage in STAGES:
        where = stage.__name__
        assert isinstance(stage.NAME, str) and re.fullmatch(r"[a-z][a-z0-9_-]*", stage.NAME), where
        assert list(inspect.signature(stage.run).parameters) == ["spec", "inputs", "store", "context"], where
        hints = typing.get_type_hints(stage.run)
        assert hints["store"] is ArtifactStore and hints["context"] is StageContext, where
        assert list(inspect.signature(stage.key).parameters) == ["spec", "inputs"], where
        result = hints["return"]
        if typing.get_type_hints(stage.key)["return"] is type(None):  # never cached: returns a record with a URI
            assert issubclass(result, BaseModel) and hasattr(result, "uri"), where
        else:  # cached: its result is a ref the store keeps
            assert issubclass(result, Ref), where
        assert all(isinstance(tag, str) for tag in getattr(stage, "TAGS", ())), where
        if hasattr(stage, "summary"):
            assert list(inspect.signature(stage.summary).parameters) == ["ref", "store"], where
        assert len(code_version(stage.__name__)) == 64


def test_the_code_version_covers_every_project_module_a_stage_imports(tmp_path, monkeypatch):
    # distill_stage imports the training loop only inside a function: it is code the stage runs.
    before = code_version("compression.distill_stage")
    edited = tmp_path / "train.py"
    edited.write_text((REPO / "model" / "train.py").read_text() + "\n# an edit\n")
    real = model.contract._source_file
    monkeypatch.setattr(model.contract, "_source_file", lambda name: edited if name == "model.train" else real(name))
    code_version.cache_clear()
    try:
        assert code_version("compression.distill_stage") != before
        assert code_version("registry.register_stage") == code_version("registry.register_stage")
    finally:
        monkeypatch.undo()
        code_version.cache_clear()


# --------------------------------------------------------------------------------------
# Every stage, run once on micro inputs through a store that records who writes
# --------------------------------------------------------------------------------------


def _inside_produce() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is model.contract.produce.__code__:
            return True
        frame = frame.f_back
    return False


class RecordingStore(LocalStore):
    """A local store that notes each publish and ref write, and whether ``produce`` made it."""

    def __init__(self, root):
        super().__init__(root)
        self.writes: list[tuple[str, str, bool]] = []

    def publish(self, local_dir, key):
        self.writes.append(("publish", key, _inside_produce()))
        return super().publish(local_dir, key)

    def write_ref(self, key, ref):
        self.writes.append(("write_ref", key, _inside_produce()))
        return super().write_ref(key, ref)


TINY_TRAIN = dict(batch_size=4, micro_batch_size=4, lr=1e-2, warmup_steps=1, checkpoint_every=2, eval_every=2,
                  eval_batches=1)


@pytest.fixture(scope="module")
def every_stage(corpus_dir, tmp_path_factory):
    """Each stage but registration (MLflow's, tested in test_registry*) called once, in order."""
    store, context = RecordingStore(tmp_path_factory.mktemp("contract")), StageContext("contract")
    calls = []

    def call(stage, spec, inputs):
        ref = stage.run(spec, inputs, store, context)
        calls.append((stage, spec, inputs, ref))
        return ref

    data = call(data_stage, DataStageSpec(data=DataSpec(source=str(corpus_dir), seq_len=32, validation_fraction=0.1),
                                          tokenizer=TokenizerSpec(vocab_size=512)), {})
    teacher = call(pretrain_stage, PretrainSpec(model=ModelSpec(preset="micro"), train=TrainSpec(steps=2, **TINY_TRAIN)),
                   {"data": data})
    teacher_and_data = {"teacher": teacher, "data": data}
    scores = call(importance_stage, ImportanceSpec(samples=4, batch_size=4, layer_samples=2), teacher_and_data)
    search = call(search_stage, SearchSpec(space=SearchSpace(hidden_size=[48, 64]), budget=Budget(memory_gib=64),
                                           top_k=1, zero_shot_sequences=4,
                                           short_kd=DistillSpec(train=TrainSpec(steps=2, **TINY_TRAIN))),
                  teacher_and_data | {"scores": scores})
    student = call(prune_stage, PruneSpec(), {"teacher": teacher, "scores": scores, "search": search})
    distilled = call(distill_stage, DistillSpec(train=TrainSpec(steps=2, **TINY_TRAIN)),
                     {"student": student, "teacher": teacher, "data": data})
    call(evaluate_stage, EvaluateSpec(sections=["quality"], quality=QualitySpec(
        validation_rows=4, generation_prompts=1, prompt_tokens=4, generation_tokens=4)),
         {"teacher": teacher, "models": [distilled], "data": data})
    call(sdg_stage, SDGSpec.model_validate({
        "generator": {"model": "teacher", "max_new_tokens": 8, "temperature": 1.0, "batch_size": 4},
        "open_qa": {"topics": ["rivers", "prime numbers"], "subtopics_per_topic": 1, "questions_per_topic": 1},
        "responses": {"per_prompt": 2}}), {"generator": teacher})
    sft_data, preference_data = write_alignment_data(tmp_path_factory.mktemp("alignment-data"), rows=8)
    tiny_loop = TrainSpec(steps=2, batch_size=4, micro_batch_size=2, lr=1e-3, warmup_steps=0, checkpoint_every=1)
    sft = call(sft_stage, SFTSpec(data=str(sft_data), max_length=32, train=tiny_loop),
               {"model": distilled, "data": dataset_ref(str(sft_data), store)})
    preference_data_ref = dataset_ref(str(preference_data), store)
    call(preference_stage, PreferenceSpec(data=str(preference_data), max_length=32, train=tiny_loop),
         {"model": sft, "data": preference_data_ref})
    call(reward_stage, RewardSpec(data=str(preference_data), steps=4, held_out_fraction=0.25),
         {"base": teacher, "data": preference_data_ref})
    return store, context, calls


def test_every_stage_makes_its_result_through_produce_and_a_second_call_finds_it(every_stage):
    store, context, calls = every_stage
    assert {stage.NAME for stage, *_ in calls} == {stage.NAME for stage in STAGES} - {"register"}
    outside = [(what, key) for what, key, inside in store.writes if not inside]
    assert not outside, f"written outside model/contract.py: produce: {outside}"
    for stage, spec, inputs, ref in calls:
        assert store.read_ref(ref_key(stage.NAME, stage.key(spec, inputs)), type(ref)) == ref, stage.NAME
        assert store.verify(ref.uri, ref.digest) and ref.lineage.stage == stage.NAME
        assert ref.lineage.recipe_name == "contract"

    writes = len(store.writes)
    for stage, spec, inputs, ref in calls:
        assert stage.run(spec, inputs, store, context) == ref, stage.NAME
    assert len(store.writes) == writes  # nothing published or stored again


def test_the_data_key_covers_the_whole_spec(corpus_dir):
    spec = DataStageSpec(data=DataSpec(source=str(corpus_dir), seq_len=32, validation_fraction=0.1),
                         tokenizer=TokenizerSpec(vocab_size=512))
    other = spec.model_copy(update={"data": spec.data.model_copy(update={"validation_fraction": 0.2})})
    assert data_stage.key(spec, {}) != data_stage.key(other, {})


# --------------------------------------------------------------------------------------
# A stage written elsewhere: its module and one line
# --------------------------------------------------------------------------------------


def compose_with_toy(recipe, runner) -> dict:
    refs = compose(recipe, "pretrain", runner)
    refs["toy"] = runner.run(toy_stage, toy_stage.ToySpec(), {"model": refs["teacher"]})  # the one line
    return refs


def test_a_stage_written_elsewhere_plugs_in_with_one_line(corpus_dir, tmp_path, monkeypatch):
    recipe = parse_recipe(recipe_dict(corpus_dir, train={"steps": 2}))
    store = LocalStore(tmp_path / "store")

    planner = PlanRunner(store)
    steps = planner.name_steps(compose_with_toy(recipe, planner))
    assert [(s.name, s.stage, s.cached) for s in steps] == [("data", "data", False), ("teacher", "pretrain", False),
                                                            ("toy", "toy", False)]
    assert steps[0].reason.startswith("no stored result") and steps[2].reason == "after pretrain"

    refs = compose_with_toy(recipe, DirectRunner(store, context_for(recipe)))
    record = json.loads((Path(refs["toy"].uri) / "count.json").read_text())
    assert record == {"vocab_size": 512, "parameters": refs["teacher"].architecture.parameters, "note": "counted"}
    assert refs["toy"].lineage.parents == [refs["teacher"].digest]

    planner = PlanRunner(store)
    assert all(step.cached for step in planner.name_steps(compose_with_toy(recipe, planner)))

    def fail(*args) -> ArtifactRef:
        raise AssertionError("a stored result was computed again")

    monkeypatch.setattr(toy_stage, "run", fail)
    assert compose_with_toy(recipe, DirectRunner(store, context_for(recipe)))["toy"] == refs["toy"]


# --------------------------------------------------------------------------------------
# A repository that stands on its own, with dependencies pointing inward
# --------------------------------------------------------------------------------------

ORCHESTRATION = {"prefect", "mlflow", "tasks", "flows"}
MUST_NOT_IMPORT = {  # docs/design.md, section 1
    "model": ORCHESTRATION | {"compression", "evaluation", "sdg", "store", "registry"},
    "compression": ORCHESTRATION | {"evaluation", "sdg", "store", "registry"},
    "evaluation": ORCHESTRATION | {"compression", "sdg", "store", "registry"},
    "sdg": ORCHESTRATION | {"compression", "evaluation", "store", "registry"},
    "store": ORCHESTRATION | {"compression", "evaluation", "sdg", "registry"},
    "registry": {"prefect", "tasks", "flows"},
    "tasks": {"flows"},
}


def test_dependencies_point_inward():
    import ast

    problems = []
    for package, forbidden in MUST_NOT_IMPORT.items():
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
                problems += [f"{path.relative_to(REPO)}:{node.lineno} imports {name}"
                             for name in names if name.split(".")[0] in forbidden]
    assert not problems, "\n".join(problems)


CITABLE = (".py", ".md", ".yaml", ".yml", ".toml", ".json")


def _project_files():
    skip = {".git", ".venv", ".factory", "__pycache__", ".pytest_cache", ".ruff_cache"}
    for path in sorted(REPO.rglob("*")):
        parts = set(path.relative_to(REPO).parts)
        if path.is_file() and path.suffix in CITABLE and not parts & skip and not any(p.endswith(".egg-info") for p in parts):
            yield path


def test_the_repository_cites_only_itself():
    # The design folder the factory grew from, outside the repository: its parent folder, its
    # reference files, its design file (spelled here so that this file does not cite them itself).
    folder = "shared"
    outside = re.compile(rf"\.\./{folder}|{folder}/(DESIGN|reference)|\breference/\w+\.md|\bDESIGN\.md")
    cited = re.compile(r"(?<![\w/.-])docs/[\w./-]+\.md")  # the repository's docs/, not another project's
    problems = []
    for path in _project_files():
        text = path.read_text(errors="replace")
        problems += [f"{path.relative_to(REPO)} cites {m.group(0)}" for m in outside.finditer(text)]
        problems += [f"{path.relative_to(REPO)} cites {m.group(0)}, which does not exist"
                     for m in cited.finditer(text) if not (REPO / m.group(0)).is_file()]
    assert not problems, "\n".join(problems)
