"""The recipe: one YAML file that names every knob of a factory run.

Each package owns the sections it reads (``model/spec.py`` for data, tokenizer, model and
train; later ``compression/`` for compress and distill, and so on); ``Recipe`` composes
them. Loading validates everything before any compute: a bad recipe raises
``RecipeError`` listing every bad field by its dotted path.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alignment.spec import SDG, STUDENT, TEACHER, AlignSpec, RewardSpec
from compression.prune import COMPRESSIBLE_FAMILIES
from compression.spec import CompressSpec, DistillSpec
from evaluation.spec import EvaluateSpec
from model.architectures import build_model_config, format_parameters, get_family
from model.pretrain_stage import PretrainSpec
from model.spec import DataSpec, FieldErrors, ModelSpec, TokenizerSpec, TrainSpec
from registry.spec import RegisterSpec
from sdg.spec import SDGSpec


class Recipe(BaseModel):
    """A factory run: data, a teacher (pretrained, or ``start_from``), then optionally compression,
    distillation, evaluation and registration, and synthetic data. ``name`` labels every artifact
    the run produces."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64,
        description="Required: labels every artifact of the run, and is the default registered model name and "
                    "MLflow experiment. Up to 64 letters, digits, '.', '_' or '-', starting with a letter or digit.",
    )
    description: str = Field(
        "",
        description="Free text for people reading the recipe; logged with the recipe, no stage reads it.",
    )
    data: DataSpec = Field(DataSpec(), description="The training text and how it is cut into sequences.")
    tokenizer: TokenizerSpec = Field(
        TokenizerSpec(),
        description="A BPE trained on the data, or a given tokenizer; not used with `start_from`, which brings "
                    "the teacher's.",
    )
    model: ModelSpec = Field(
        ModelSpec(),
        description="The teacher's architecture, pretrained from scratch; with `start_from` it only describes "
                    "that checkpoint.",
    )
    train: TrainSpec = Field(TrainSpec(), description="The pretraining loop; not used with `start_from`.")
    start_from: str | None = Field(
        None,
        description="A teacher to compress instead of pretraining one: a checkpoint folder, `models:/NAME@ALIAS`, "
                    "`s3://...` (a checkpoint published by the factory's artifact store) or `hf:ORG/NAME`; its "
                    "tokenizer replaces the tokenizer section. Null pretrains the teacher.",
    )
    compress: CompressSpec | None = Field(
        None,
        description="Importance scoring, then pruning to a fixed target or the result of a search; null: the "
                    "recipe can only pretrain.",
    )
    distill: DistillSpec | None = Field(
        None, description="Distillation of the pruned student from the teacher; needs `compress`.",
    )
    evaluate: EvaluateSpec = Field(
        EvaluateSpec(),
        description="What is measured on the teacher and the distilled student, and the gate the student must pass.",
    )
    registry: RegisterSpec = Field(
        RegisterSpec(), description="How the run's models are named and tracked in MLflow.",
    )
    sdg: SDGSpec | None = Field(
        None, description="Synthetic data generation (`factory sdg`, sdg/spec.py); null: none.",
    )
    align: AlignSpec | None = Field(
        None,
        description="SFT then preference optimisation (DPO) of the distilled student (or the teacher, or a given "
                    "checkpoint) on the synthetic data, with TRL; the aligned model is evaluated and registered as "
                    "a new version (`factory align`, alignment/spec.py). Null: none.",
    )
    reward_model: RewardSpec | None = Field(
        None,
        description="A reward head trained on a base checkpoint (`factory reward`): the reward model the sdg "
                    "scorer reads. Null: none.",
    )

    @field_validator("start_from")
    @classmethod
    def _teacher_exists(cls, start_from: str | None) -> str | None:
        if start_from is None or start_from.startswith(("models:/", "hf:", "s3://")):  # resolved when the run starts
            return start_from
        if not (Path(start_from).expanduser() / "config.json").is_file():
            raise ValueError(f"no checkpoint (config.json) at {start_from}")
        return start_from

    @model_validator(mode="after")
    def _compression_fits_the_model(self):
        if self.distill is not None and self.compress is None:
            raise FieldErrors({"compress": "distill needs a compress section to produce the student"})
        if self.compress is not None and not self.start_from and self.model.family not in COMPRESSIBLE_FAMILIES:
            raise FieldErrors({"compress": f"pruning supports {sorted(COMPRESSIBLE_FAMILIES)}; a {self.model.family} "
                                           "model can be pretrained, evaluated and registered, not compressed yet"})
        return self

    @model_validator(mode="after")
    def _alignment_has_its_inputs(self):
        models, data, problems = [], [], {}
        if self.align is not None:
            models.append(("align.model", self.align.model))
            data += [(f"align.{name}.data", step.data) for name, step in self.align.steps()]
            if self.align.model in (STUDENT, TEACHER) and not self.start_from and self.model.family == "hymba":
                problems["align.model"] = ("TRL's trainers pad batches, which a hymba model's forward does not take: "
                                           "the align stages support nemotron_h models")
        if self.reward_model is not None:
            models.append(("reward_model.base", self.reward_model.base))
            data.append(("reward_model.data", self.reward_model.data))
        problems |= {path: f"{STUDENT!r} is the distilled student, and the recipe has no distill section"
                     for path, model in models if model == STUDENT and self.distill is None}
        problems |= {path: f"{SDG!r} is this recipe's synthetic data, and the recipe has no sdg section"
                     for path, value in data if value == SDG and self.sdg is None}
        if problems:
            raise FieldErrors(problems)
        return self

    def pretrain_spec(self) -> PretrainSpec:
        return PretrainSpec(model=self.model, train=self.train)


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
    family = get_family(recipe.model.family)
    if recipe.start_from:  # the teacher's own tokenizer: its preset's vocabulary
        config = family.build_config(recipe.model.preset, recipe.model.overrides)
    elif recipe.tokenizer.path:
        from model.tokenizer import load_tokenizer

        config = build_model_config(recipe.model, load_tokenizer(recipe.tokenizer.path))
    else:
        config = build_model_config(recipe.model, _VocabOnly(recipe.tokenizer.vocab_size))
    arch = family.summarize(config)
    kinds = arch["parameters_by_kind"]

    t = recipe.train
    tokens = t.steps * t.batch_size * recipe.data.seq_len
    if recipe.start_from:
        tokenizer = "the teacher's tokenizer"
    else:
        tokenizer = f"tokenizer {recipe.tokenizer.path}" if recipe.tokenizer.path else f"BPE vocabulary {recipe.tokenizer.vocab_size}"
    lines = [
        f"recipe {recipe.name}: valid",
        f"  model  {recipe.model.family} preset {recipe.model.preset}, {len(arch['layer_pattern'])} layers "
        f"{arch['layer_pattern']}, {format_parameters(arch['parameters'])} parameters",
        "         " + ", ".join(f"{kind} {format_parameters(n)}" for kind, n in kinds.items()),
        f"  data   {recipe.data.source}, sequences of {recipe.data.seq_len} tokens, {tokenizer}",
    ]
    if recipe.start_from:
        lines.insert(1, f"  teacher  {recipe.start_from} (instead of pretraining; the model section describes it)")
    else:
        lines.append(f"  train  {t.steps} steps x {t.batch_size} sequences x {recipe.data.seq_len} tokens = {tokens:,} "
                     f"tokens; {t.schedule} lr {t.lr:g}, warmup {t.warmup_steps}, {t.num_processes} process(es)")
    if recipe.compress is not None:
        c = recipe.compress
        if c.search is not None:
            space = c.search.space
            choices = [len(getattr(space, f)) or 1 for f in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                             "mamba_num_heads", "mamba_head_dim", "num_layers")]
            combos = 1
            for n in choices + [len(space.keep_attention_layers)]:
                combos *= n
            b = c.search.budget
            budget = {k: v for k, v in (("parameters", b.parameters), ("memory_gib", b.memory_gib),
                                        ("decode_latency_ms", b.decode_latency_ms)) if v is not None}
            if b.parameters is not None:
                budget["parameter_tolerance"] = b.parameter_tolerance
            if b.memory_gib is not None:
                budget |= {"context": b.context, "dtype": b.dtype}
            lines.append(f"  compress  importance on {c.importance.samples} sequences; search over {combos} "
                         f"combinations, budget {budget}; top {c.search.top_k} get {c.search.short_kd.train.steps} KD steps")
        else:
            lines.append(f"  compress  importance on {c.importance.samples} sequences; target "
                         f"{c.target.model_dump(exclude_none=True, exclude_defaults=True)}")
    if recipe.distill is not None:
        d = recipe.distill.train
        lines.append(f"  distill  {d.steps} steps x {d.batch_size} x {recipe.data.seq_len} = "
                     f"{d.steps * d.batch_size * recipe.data.seq_len:,} tokens, T={recipe.distill.temperature}")
    if recipe.sdg is not None:
        lines.append(f"  sdg  {recipe.sdg.describe()}")
    if recipe.align is not None:
        lines.append(f"  align  {recipe.align.describe()}")
    if recipe.reward_model is not None:
        r = recipe.reward_model
        lines.append(f"  reward_model  {r.objective} head on {r.base}, {r.steps} steps on {r.data}")
    return "\n".join(lines)


def explain(recipe: BaseModel) -> str:
    """What ``factory validate --explain`` prints: every field of the recipe by its dotted path,
    its value (and its default where the recipe changes it), and its description: the same
    text the Prefect UI's form shows (``Field(description=...)``)."""
    import json
    import textwrap

    from pydantic_core import PydanticUndefined, to_jsonable_python

    def shown(value) -> str:
        return json.dumps(to_jsonable_python(value))

    lines: list[str] = []

    def describe(text: str | None, indent: str) -> None:
        if text:
            lines.extend(textwrap.wrap(" ".join(text.split()), 100, initial_indent=indent + "    ",
                                       subsequent_indent=indent + "    "))

    def walk(section: BaseModel, defaults: BaseModel | None, prefix: str, depth: int) -> None:
        """``defaults``: what this section is when the recipe leaves it out (its parent field's
        default: ``distill.train`` defaults to 100 steps, not TrainSpec's 200)."""
        indent = "  " * depth
        for name, info in type(section).model_fields.items():
            value, path = getattr(section, name), f"{prefix}{name}"
            default = getattr(defaults, name) if defaults is not None else info.get_default(call_default_factory=True)
            if isinstance(value, BaseModel):
                lines.append(f"{indent}{path}:")
                describe(info.description or (type(value).__doc__ or "").strip().split("\n\n")[0], indent)
                walk(value, default if isinstance(default, BaseModel) else None, f"{path}.", depth + 1)
                continue
            changed = default is not PydanticUndefined and shown(default) != shown(value)
            lines.append(f"{indent}{path} = {shown(value)}" + (f"   (default {shown(default)})" if changed else ""))
            describe(info.description, indent)

    walk(recipe, None, "", 0)
    return "\n".join(lines)
