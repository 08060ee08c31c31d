"""The register stage: a published checkpoint becomes a version in the MLflow model registry.

    run(RegistrationSpec, {"model": ModelRef, "data": DataRef | ArtifactRef, "evaluation": Evaluation (optional),
                           "parent": ModelVersionRef (optional)}, store, context) -> ModelVersionRef

The version is made from the checkpoint's logged model, which the run of the stage that
trained it logged (``pretrain``, ``distill``), so its source run is that run; a checkpoint no
run logged yet (a recipe's ``start_from``) is logged into this stage's run. The version carries
its lineage as tags (``registry/models.py``: the data's digest, which for an aligned model is the
synthetic data's, and its parent version: ``parent``, else the registered checkpoint it was made
from) and gets ``@candidate``; with an evaluation among
the inputs, the model's gate is recorded on it and ``@champion`` moves to
it only when the gate passed. Never cached (``key`` is None): the registry is its own record,
and registration is idempotent on the checkpoint digest, so running it again after a crash
anywhere returns the same version and adds only what is missing.
"""

from __future__ import annotations

from pydantic import Field

from model.contract import ArtifactStore, StageContext
from model.spec import Section
from registry.models import ModelVersionRef

NAME = "register"


class RegistrationSpec(Section):
    """Under which name and experiment a checkpoint is registered, and which metrics its version shows."""

    model_name: str
    experiment: str
    key_metrics: tuple[str, ...] = Field(default=("val_loss", "final_loss", "tokens_seen"))


def key(spec: RegistrationSpec, inputs: dict) -> None:
    return None


def run(spec: RegistrationSpec, inputs: dict, store: ArtifactStore, context: StageContext) -> ModelVersionRef:
    """Register ``inputs['model']``; record its gate from ``inputs['evaluation']`` when given."""
    from registry import models, tracking

    ref = inputs["model"]
    evaluation = inputs.get("evaluation")
    parent = inputs.get("parent")
    tracking.configure_tracking()
    version = models.register_checkpoint(ref, store, spec.model_name, run_id=context.parent_run,
                                         experiment=spec.experiment, recipe_digest=context.recipe_digest,
                                         data_digest=inputs["data"].digest if inputs.get("data") else "",
                                         parent=(parent.name, parent.version) if parent is not None else None,
                                         key_metrics=spec.key_metrics)
    gate = evaluation.gate_of(ref.digest) if evaluation is not None else None
    if gate is not None:
        models.set_gate_result(spec.model_name, version.version, gate.passed,
                               evaluation.metrics.get(evaluation.label_of(ref.digest), {}))
    return version
