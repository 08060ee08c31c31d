"""A stage written outside the factory's packages, by a test: what adding a stage takes.

This module (NAME, key, run: model/contract.py) and one line where the stages are composed;
no runner, task or command changes. It records a checkpoint's vocabulary and parameter count.
"""

from __future__ import annotations

import json
from pathlib import Path

from model.contract import (
    ArtifactRef,
    ArtifactStore,
    Output,
    StageContext,
    lineage,
    local_folder,
    produce,
    stage_key,
)
from model.spec import Section

NAME = "toy"


class ToySpec(Section):
    note: str = "counted"


def key(spec: ToySpec, inputs: dict) -> str:
    return stage_key(NAME, __name__, spec, inputs)


def run(spec: ToySpec, inputs: dict, store: ArtifactStore, context: StageContext) -> ArtifactRef:
    model = inputs["model"]

    def count(work: Path) -> Output:
        config = json.loads((local_folder(store, model) / "config.json").read_text())
        record = {"vocab_size": config["vocab_size"], "parameters": model.architecture.parameters, "note": spec.note}
        (work / "count.json").write_text(json.dumps(record))
        return Output(work, {"kind": "toy", "metadata": record})

    return produce(ArtifactRef, store, key(spec, inputs), lineage(NAME, __name__, spec, inputs, context), count,
                   label=context.recipe_name)
