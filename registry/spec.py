"""The recipe's ``registry`` section: how a run's models are named and tracked in MLflow."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from model.spec import Section

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # no '@' or '/': names appear in models:/NAME@ALIAS


class RegisterSpec(Section):
    """Registered model and MLflow experiment of a factory run.

    ``model_name`` and ``experiment`` default to the recipe's name. ``key_metrics`` are the
    checkpoint metrics copied onto each model version (as ``metric.<name>`` tags) and shown
    by ``factory models list``.
    """

    model_name: str | None = Field(
        None, max_length=128,
        description="Registered model name of the distilled student; the teacher is registered as "
                    "`<model_name>-teacher`. Up to 128 letters, digits, '.', '_' or '-', starting with a letter or "
                    "digit (it appears in models:/NAME@ALIAS); null uses the recipe's name.",
    )
    experiment: str | None = Field(
        None, min_length=1, max_length=256,
        description="MLflow experiment the factory run and its stage runs are logged in; null uses the recipe's "
                    "name.",
    )
    key_metrics: tuple[str, ...] = Field(
        ("val_loss", "final_loss", "tokens_seen"),
        description="Checkpoint metrics copied onto each registered version as `metric.<name>` tags (those the "
                    "checkpoint has) and shown by `factory models list`.",
    )

    @field_validator("model_name")
    @classmethod
    def _usable_in_uris(cls, name: str | None) -> str | None:
        if name is not None and not re.match(NAME_PATTERN, name):
            raise ValueError(f"use letters, digits, '.', '_' and '-' (it appears in models:/NAME@ALIAS), got {name!r}")
        return name

    def resolved_model_name(self, recipe_name: str) -> str:
        return self.model_name or recipe_name

    def resolved_experiment(self, recipe_name: str) -> str:
        return self.experiment or recipe_name
