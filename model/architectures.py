"""Model families the factory can build, train and save: one entry per architecture.

A family knows its presets, which config fields a recipe may override, how to build a
config and check it, how to summarize it for a ModelRef, and its ``PreTrainedModel``
class. Everything downstream (pretraining, evaluation, the registry) goes through this
table, so adding an architecture is adding an entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PretrainedConfig, PreTrainedModel

from model import hymba, nemotron_h


@dataclass(frozen=True)
class Family:
    name: str
    presets: dict[str, dict]
    config_fields: set[str]
    # (preset, overrides, **special_token_ids) -> config; raises ValueError on bad input
    build_config: Callable[..., PretrainedConfig]
    # config -> {field: what is wrong} for shapes that cannot run
    config_problems: Callable[[PretrainedConfig], dict[str, str]]
    # config -> ArchSummary fields (family, parameters, parameters_by_kind, layer_pattern, config)
    summarize: Callable[[PretrainedConfig], dict]
    model_class: type[PreTrainedModel]


FAMILIES: dict[str, Family] = {
    "nemotron_h": Family(
        name="nemotron_h",
        presets=nemotron_h.PRESETS,
        config_fields=nemotron_h.CONFIG_FIELDS,
        build_config=nemotron_h.build_config,
        config_problems=nemotron_h.config_problems,
        summarize=nemotron_h.summarize,
        model_class=nemotron_h.NemotronHForCausalLM,
    ),
    # Our own HF model (model/hymba/): importing it registers the Auto classes.
    "hymba": Family(
        name="hymba",
        presets=hymba.PRESETS,
        config_fields=hymba.CONFIG_FIELDS,
        build_config=hymba.build_config,
        config_problems=hymba.config_problems,
        summarize=hymba.summarize,
        model_class=hymba.HymbaForCausalLM,
    ),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def build_model_config(spec, tokenizer):
    """The recipe's architecture (a ``ModelSpec``) with the tokenizer's vocabulary and special tokens.

    ``overrides.vocab_size`` may pad the vocabulary past the tokenizer's length (embedding rows no
    token id reaches), never cut it."""
    from model.tokenizer import special_token_ids

    requested = spec.overrides.get("vocab_size")
    if requested is not None and requested < len(tokenizer):
        raise ValueError(f"model.overrides.vocab_size is {requested} but the tokenizer has {len(tokenizer)} entries: "
                         "every token id needs an embedding row")
    overrides = dict(spec.overrides) | {"vocab_size": max(requested or 0, len(tokenizer))}
    return get_family(spec.family).build_config(spec.preset, overrides, **special_token_ids(tokenizer))


def summarize_folder(folder) -> dict:
    """The ``ArchSummary`` fields of a checkpoint folder, from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    return get_family(config.model_type).summarize(config)


def external_model_ref(folder):
    """A ModelRef for a checkpoint folder the factory did not produce: its URI is the folder
    itself, its digest that of its files (a recipe's ``start_from``, ``factory prune MODEL_DIR``)."""
    from pathlib import Path

    from model.contract import EXTERNAL, ArchSummary, Lineage, ModelRef
    from model.digests import folder_digest

    folder = Path(folder).resolve()
    return ModelRef(uri=str(folder), digest=folder_digest(folder), architecture=ArchSummary(**summarize_folder(folder)),
                    lineage=Lineage(stage=EXTERNAL, spec_digest="", code_digest=""))


def format_parameters(count: int) -> str:
    """6260000 -> '6.26M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)


CHECKPOINT_FILES = ("config.json", "tokenizer.json")


def load_pretrained(path, device=None, dtype=None):
    """A checkpoint folder as (model, tokenizer), with a clear error when files are missing.

    Uses transformers' Auto classes, so any family registered with them loads."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {path}")
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors (weights)")
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is missing {', '.join(missing)}")
    net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    if device is not None:
        net.to(device)
    from model.tokenizer import with_chat_template

    return net, with_chat_template(AutoTokenizer.from_pretrained(path))
