"""The recipe: one YAML file that names every knob of a factory run.

Each package owns the sections it reads (``model/specs.py`` for data, tokenizer, model and
train; later ``compression/`` for compress and distill, and so on); ``Recipe`` composes
them. Loading validates everything before any compute: a bad recipe raises
``RecipeError`` listing every bad field by its dotted path.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from model.architectures import format_parameters, get_family
from model.evaluation.spec import EvaluateSpec
from model.pretrain import PretrainSpec, build_model_config
from model.specs import DataSpec, FieldErrors, ModelSpec, TokenizerSpec, TrainSpec
from registry.specs import RegisterSpec


class Recipe(BaseModel):
    """A factory run. ``name`` labels every artifact the run produces."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)
    description: str = ""
    data: DataSpec = DataSpec()
    tokenizer: TokenizerSpec = TokenizerSpec()
    model: ModelSpec = ModelSpec()
    train: TrainSpec = TrainSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    registry: RegisterSpec = RegisterSpec()

    def pretrain_spec(self) -> PretrainSpec:
        return PretrainSpec(name=self.name, model=self.model, train=self.train)


class RecipeError(ValueError):
    """A recipe that cannot run: ``problems`` maps dotted field paths to what is wrong."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source, self.problems = source, problems
        lines = "\n".join(f"  {path}: {message}" for path, message in problems)
        super().__init__(f"{source}: invalid recipe\n{lines}")


def validation_problems(error: ValidationError) -> list[tuple[str, str]]:
    """pydantic errors as (dotted path, message), expanding section-level FieldErrors."""
    problems = []
    for err in error.errors():
        path = ".".join(str(part) for part in err["loc"])
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, FieldErrors):
            problems += [(f"{path}.{sub}" if path else sub, message) for sub, message in cause.errors.items()]
        elif err["type"] == "extra_forbidden":
            problems.append((path, "unknown field"))
        elif err["type"] == "missing":
            problems.append((path, "required field is missing"))
        else:
            problems.append((path, err["msg"].removeprefix("Value error, ")))
    return problems


def parse_recipe(values: dict, source: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(values)
    except ValidationError as e:
        raise RecipeError(source, validation_problems(e)) from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(str(path), [("", "file not found")]) from None
    except yaml.YAMLError as e:
        raise RecipeError(str(path), [("", f"not valid YAML: {e}")]) from None
    if not isinstance(values, dict):
        raise RecipeError(str(path), [("", "a recipe is a YAML mapping of sections")])
    return parse_recipe(values, str(path))


class _VocabOnly:
    """Stands in for a tokenizer that does not exist yet: the recipe's vocabulary size."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return self.vocab_size


def summary(recipe: Recipe) -> str:
    """What ``factory validate`` prints: the resolved model size, tokens and steps."""
    if recipe.tokenizer.path:
        from model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(recipe.tokenizer.path)
    else:
        tokenizer = _VocabOnly(recipe.tokenizer.vocab_size)
    config = build_model_config(recipe.model, tokenizer)
    arch = get_family(recipe.model.family).summarize(config)
    kinds = arch["parameters_by_kind"]

    t = recipe.train
    tokens = t.steps * t.batch_size * recipe.data.seq_len
    lines = [
        f"recipe {recipe.name}: valid",
        f"  model  {recipe.model.family} preset {recipe.model.preset}, {len(arch['layer_pattern'])} layers "
        f"{arch['layer_pattern']}, {format_parameters(arch['parameters'])} parameters",
        "         " + ", ".join(f"{kind} {format_parameters(n)}" for kind, n in kinds.items()),
        f"  data   {recipe.data.source}, sequences of {recipe.data.seq_len} tokens, "
        + (f"tokenizer {recipe.tokenizer.path}" if recipe.tokenizer.path else f"BPE vocabulary {recipe.tokenizer.vocab_size}"),
        f"  train  {t.steps} steps x {t.batch_size} sequences x {recipe.data.seq_len} tokens = {tokens:,} tokens; "
        f"{t.schedule} lr {t.lr:g}, warmup {t.warmup_steps}, {t.num_processes} process(es)",
    ]
    return "\n".join(lines)
