"""Recipes validate before any compute and name every bad field by its dotted path."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.recipe import Recipe, RecipeError, load_recipe, parse_recipe

from .conftest import REPO, recipe_dict, run_cli, run_factory, write_recipe


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(recipe):
    load_recipe(recipe)


@pytest.mark.slow  # a `factory` subprocess
def test_validate_prints_resolved_summary(tmp_path):
    result = run_factory("validate", "recipes/tiny.yaml", root=tmp_path)
    assert "recipe tiny: valid" in result.stdout
    assert "6.26M parameters" in result.stdout  # hidden 256, M-M*-M-M-, vocab 4096
    assert "mamba" in result.stdout and "attention" in result.stdout and "ffn" in result.stdout
    assert "409,600 tokens" in result.stdout  # 100 steps x 16 x 256


def test_every_recipe_field_is_documented():
    """What the Prefect UI's form and `factory validate --explain` show: a description per field."""
    schema = Recipe.model_json_schema()
    undocumented = [f"{model}.{name}" for model, definition in [("Recipe", schema), *schema["$defs"].items()]
                    for name, field in definition.get("properties", {}).items() if not field.get("description")]
    assert not undocumented, undocumented


def _leaf_paths(section, prefix: str = "") -> list[str]:
    from pydantic import BaseModel

    paths = []
    for name in type(section).model_fields:
        value = getattr(section, name)
        paths += _leaf_paths(value, f"{prefix}{name}.") if isinstance(value, BaseModel) else [f"{prefix}{name}"]
    return paths


def test_explain_shows_every_field_its_value_default_and_description(capsys):
    code, out, _ = run_cli("validate", "--explain", str(REPO / "recipes" / "tiny.yaml"), capsys=capsys)
    assert code == 0 and out.startswith("recipe tiny: valid")
    listed = {line.strip().split(" = ")[0] for line in out.splitlines() if " = " in line}
    assert set(_leaf_paths(load_recipe(REPO / "recipes" / "tiny.yaml"))) <= listed
    lines = out.splitlines()
    fraction = lines.index("  data.validation_fraction = 0.05   (default 0.02)")
    assert "held out" in lines[fraction + 1]  # its description follows
    assert "    distill.train.steps = 40   (default 100)" in lines  # the distill section's own default


BAD_VALUES = [
    ({"train": {"steps": -1}}, "train.steps"),
    ({"train": {"batch_size": 0}}, "train.batch_size"),
    ({"model": {"overrides": {"hidden_size": 0}}}, "model.overrides.hidden_size"),
    ({"model": {"overrides": {"mamba_num_heads": 6}}}, "model.overrides.mamba_num_heads"),  # 4 groups
    ({"model": {"overrides": {"num_attention_heads": 3}}}, "model.overrides.num_attention_heads"),  # 2 KV heads
    ({"model": {"preset": "nemotron-h-9b"}}, "model.preset"),
    ({"model": {"overrides": {"mamba_heads": 8}}}, "model.overrides.mamba_heads"),
    ({"data": {"source": "/no/such/corpus"}}, "data.source"),
    ({"train": {"lr_warmup": 5}}, "train.lr_warmup"),
    ({"trian": {"steps": 5}}, "trian"),
    ({"train": {"batch_size": 6, "micro_batch_size": 4}}, "train.batch_size"),
    ({"tokenizer": {"vocab_size": 100}}, "tokenizer.vocab_size"),
]


@pytest.mark.parametrize("change, path", BAD_VALUES, ids=[p for _, p in BAD_VALUES])
def test_bad_value_is_reported_with_its_path(corpus_dir, change, path):
    with pytest.raises(RecipeError) as info:
        parse_recipe(recipe_dict(corpus_dir, **change))
    assert path in [p for p, _ in info.value.problems], info.value.problems


@pytest.mark.slow  # `factory` subprocesses
def test_every_bad_field_is_listed_and_cli_exits_2_without_traceback(corpus_dir, tmp_path):
    bad = recipe_dict(corpus_dir, train={"steps": 0, "lr": -1.0}, model={"preset": "huge"},
                      data={"source": str(tmp_path / "missing")})
    result = run_factory("validate", str(write_recipe(tmp_path / "bad.yaml", bad)), root=tmp_path, check=False)
    assert result.returncode == 2
    for path in ("train.steps", "train.lr", "model.preset", "data.source"):
        assert path in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # `factory` subprocesses
def test_not_yaml_and_missing_file(tmp_path):
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "broken.yaml")
    result = run_factory("validate", str(tmp_path / "nope.yaml"), root=tmp_path, check=False)
    assert result.returncode == 2 and "file not found" in result.stderr


def test_published_presets_have_published_sizes():
    from model.nemotron_h import build_config, parameters_by_kind

    # docs/architectures.md 1.1: 8B -> 8.10B, 4B -> 4.49B, 56B -> 56.3B, 47B -> 46.8B
    expected = {"nemotron-h-8b": 8.10e9, "nemotron-h-4b": 4.49e9, "nemotron-h-56b": 56.3e9, "nemotron-h-47b": 46.8e9}
    for preset, size in expected.items():
        total = sum(parameters_by_kind(build_config(preset)).values())
        assert abs(total - size) / size < 0.01, (preset, total)


def test_relative_data_path_is_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("corpus").mkdir()
    (Path("corpus") / "a.txt").write_text("hello")
    parse_recipe({"name": "x", "data": {"source": "corpus"}})


def test_compressing_a_family_that_pruning_does_not_cover_is_refused(corpus_dir, monkeypatch):
    hymba = recipe_dict(corpus_dir, model={"family": "hymba", "preset": "micro"}, compress={"target": {"hidden_size": 32}})
    assert parse_recipe(hymba).compress.target.hidden_size == 32  # compression/hymba.py covers it
    # A family registered without compression support (as Hymba was until it had its own slicing):
    monkeypatch.setattr("flows.recipe.COMPRESSIBLE_FAMILIES", {"nemotron_h"})
    with pytest.raises(RecipeError) as info:
        parse_recipe(hymba)
    assert [p for p, _ in info.value.problems] == ["compress"]
    assert "hymba" in info.value.problems[0][1]


def test_start_from_takes_the_forms_the_run_resolves_and_names_a_missing_folder(corpus_dir, tmp_path):
    for uri in ("models:/parent@champion", "s3://bucket/prefix/pretrain/parent/model", "hf:org/name"):
        assert parse_recipe(recipe_dict(corpus_dir, start_from=uri)).start_from == uri
    with pytest.raises(RecipeError, match=r"start_from: no checkpoint \(config.json\) at"):
        parse_recipe(recipe_dict(corpus_dir, start_from=str(tmp_path / "nowhere")))


def test_a_model_may_pad_its_vocabulary_past_the_tokenizer_but_never_cut_it():
    """The rehearsal pads a ~78k-entry BPE to Nemotron-H's 131,072 embedding rows."""
    from model.architectures import build_model_config
    from model.spec import ModelSpec
    from model.tokenizer import train_bpe

    tokenizer = train_bpe(["def f(x):\n    return x + 1\n"] * 50, vocab_size=300)
    assert build_model_config(ModelSpec(preset="micro"), tokenizer).vocab_size == len(tokenizer)
    padded = build_model_config(ModelSpec(preset="micro", overrides={"vocab_size": 1024}), tokenizer)
    assert padded.vocab_size == 1024
    with pytest.raises(ValueError, match=r"vocab_size is 100 but the tokenizer has \d+ entries"):
        build_model_config(ModelSpec(preset="micro", overrides={"vocab_size": 100}), tokenizer)
