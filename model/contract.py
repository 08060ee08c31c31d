"""The stage contract: what every stage takes, returns and promises (docs/stage-contract.md).

A stage is a module that exports

    NAME = "distill"                       the stage's name: its Prefect task, MLflow run and store folder
    TAGS = ("gpu",)                        (optional) Prefect tags: a tag concurrency limit guards the GPUs
    def key(spec, inputs) -> str | None    its cache key; None: never cached (registration)
    def run(spec, inputs, store: ArtifactStore, context: StageContext) -> <a Ref>
    def summary(ref, store) -> Summary     (optional) what the UIs show beyond the ref

``spec`` is the recipe section the stage reads (a pydantic model), ``inputs`` maps names to the
refs earlier stages returned, ``store`` is where it works and publishes (``store/``: a local
folder or S3), and ``context`` says for which recipe, under which tracking run and on which
device it runs. A stage returns a ref: a small JSON record of where its artifact lives, the
artifact's digest, what it is and where it came from. Stages pass refs, never tensors or
models, so an orchestrator can hash, persist and compare them cheaply.

The cache key is the stage's name, the digest of its spec, the digests of its inputs and its
code version (``code_version``: the source of its module and of every project module that
module imports). Every stage makes its result through ``produce``:

    key -> the stored ref, if its artifact is still whole (a cache hit: nothing runs)
        -> a work folder that survives a crash (training checkpoints live there)
        -> the stage's work -> publish (files first, manifest last) -> digest -> ref, stored last

Prefect's cache (``tasks/``) calls the same ``key``, so the flow and the store never disagree.
Adding a stage is writing its module and adding one line to ``flows/pipeline.py: compose``.

Nothing here imports torch, transformers, Prefect or MLflow: ``factory run --plan`` reads keys
and stored refs without loading any of them.
"""

from __future__ import annotations

import ast
import hashlib
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import NamedTuple, Protocol, TypeVar

from pydantic import BaseModel, Field

from model.device import DevicePolicy
from model.digests import json_digest, spec_digest

EXTERNAL = "external"  # the lineage stage of a checkpoint the factory did not produce (a folder as it is)
MODEL_DIR = "model"  # where a stage that makes a checkpoint puts it in its work folder (and publishes it from)
CHECKPOINTS_DIR = "checkpoints"  # where a training stage's loop keeps its resumable checkpoints in its work folder
StepCallback = Callable[[dict], None]  # called by the training loop with each optimizer step's record


# --------------------------------------------------------------------------------------
# Refs: what stages return
# --------------------------------------------------------------------------------------


class Lineage(BaseModel):
    stage: str
    spec_digest: str
    code_digest: str
    parents: list[str] = Field(default_factory=list)  # digests of the inputs
    recipe_name: str = ""


class Ref(BaseModel):
    """An artifact in the store: where it is, the digest of its files, where it came from."""

    uri: str
    digest: str
    lineage: Lineage


class ArchSummary(BaseModel):
    family: str
    parameters: int
    parameters_by_kind: dict[str, int] = Field(default_factory=dict)
    layer_pattern: str = ""
    config: dict[str, int | float | str] = Field(default_factory=dict)


class ModelRef(Ref):
    """A checkpoint folder (``save_pretrained`` + tokenizer)."""

    architecture: ArchSummary
    metrics: dict[str, float] = Field(default_factory=dict)


class DataRef(Ref):
    """Tokenized, packed token shards plus the tokenizer that produced them."""

    tokenizer_uri: str
    tokenizer_digest: str
    source: str
    source_digest: str
    seq_len: int
    train_tokens: int
    validation_tokens: int


class ArtifactRef(Ref):
    """Any other stage output kept as files: importance scores, a search report, datasets."""

    kind: str
    metadata: dict = Field(default_factory=dict)


class Summary(BaseModel):
    """What a finished stage shows besides its ref: plain data that ``tasks/`` renders in the
    Prefect UI (markdown and table artifacts) and in the stage's MLflow run (files, metrics)."""

    markdown: str = ""  # the Prefect markdown artifact; "": a generic summary of the ref, then ``notes``
    notes: str = ""
    table: list[dict] = Field(default_factory=list)
    table_description: str = ""
    files: list[str] = Field(default_factory=list)  # local files logged as the run's artifacts
    metrics: dict[str, float] = Field(default_factory=dict)


# --------------------------------------------------------------------------------------
# What a stage runs against: the store and its context
# --------------------------------------------------------------------------------------


class ArtifactStore(Protocol):
    """Where stages keep their work and publish their results (``store/``: local or S3)."""

    root: str

    def stage_dir(self, stage: str, name: str) -> Path:
        """A local working folder for one stage run; it survives a crash, so checkpoints go here."""

    def publish(self, local_dir: Path, key: str) -> str:
        """Make ``local_dir`` readable at ``key``, atomically (manifest last); returns its URI."""

    def published_digest(self, uri: str) -> str | None:
        """The digest recorded in the artifact's manifest, or None if it was never published."""

    def verify(self, uri: str, digest: str) -> bool:
        """True when the artifact at ``uri`` is complete and its files match ``digest``."""

    def fetch(self, uri: str) -> Path:
        """A local folder with the artifact's files (downloaded if remote)."""

    def mirror_checkpoints(self, local_dir: Path, keep: int) -> AbstractContextManager:
        """While the body runs, keep the training checkpoints written under ``local_dir`` (inside a
        ``stage_dir``) in the store, and first restore the store's newest one when the local disk
        has none as new: what lets a training stage resume on another machine."""

    def write_ref(self, key: str, ref: BaseModel) -> str: ...

    def read_ref(self, key: str, cls: type[BaseModel]) -> BaseModel | None: ...


@dataclass(frozen=True)
class StageContext:
    """For whom and where a stage runs. Orchestration sets it; stages only read it.

    ``parent_run`` is the MLflow run the stage's records belong under (None: untracked);
    ``on_step`` receives every training step's record (MLflow's live curves) and
    ``on_progress`` the fraction of the stage's work done (the Prefect UI's progress)."""

    recipe_name: str = "factory"
    recipe_digest: str = ""
    parent_run: str | None = None
    device: DevicePolicy = field(default_factory=DevicePolicy)
    on_step: tuple[StepCallback, ...] = ()
    on_progress: Callable[[float], None] | None = None

    def progress(self, fraction: float) -> None:
        if self.on_progress is not None:
            self.on_progress(min(max(fraction, 0.0), 1.0))

    def training_callbacks(self, total_steps: int) -> tuple[StepCallback, ...]:
        """What a training loop of ``total_steps`` steps reports to: ``on_step``, and progress."""
        if self.on_progress is None:
            return self.on_step
        return (*self.on_step, lambda record: self.progress(record["step"] / total_steps))


# --------------------------------------------------------------------------------------
# Keys and lineage
# --------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("model", "compression", "evaluation", "sdg", "alignment", "registry", "store")


def _source_file(module: str) -> Path | None:
    """The file of a project module, found without importing it (imports can be slow or heavy)."""
    if module.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = REPO.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@cache
def _read_module(module: str, path: Path) -> tuple[str, frozenset[str]]:
    """A module's source and the project modules its import statements name, at any depth in
    the file (imports inside functions count: they are code the module runs)."""
    source = path.read_text()
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from model import train`
    return source, frozenset(name for name in names if name != module and _source_file(name) is not None)


@cache
def code_version(module: str) -> str:
    """Digest of the source of ``module`` and of every project module it imports, directly or
    not: editing any code a stage runs invalidates its cache, and no list of modules can drift.
    ``module`` itself may live outside the project's packages (a stage a user adds elsewhere)."""
    loaded = getattr(sys.modules.get(module), "__file__", None)
    path = _source_file(module) or (Path(loaded) if loaded else None)
    if path is None:
        raise ValueError(f"{module} is neither a module of this project ({', '.join(PROJECT_PACKAGES)}) "
                         "nor an imported module with a source file")
    sources, todo = {}, [(module, path)]
    while todo:
        name, path = todo.pop()
        if name not in sources:
            sources[name], imported = _read_module(name, path)
            todo += [(other, _source_file(other)) for other in sorted(imported)]
    sha = hashlib.sha256()
    for name in sorted(sources):
        sha.update(f"{name}\0{sources[name]}\0".encode())
    return sha.hexdigest()


def _digest_of(value):
    if isinstance(value, list | tuple):
        return [_digest_of(v) for v in value]
    return getattr(value, "digest", None) or json_digest(value)


def input_digests(inputs: dict) -> dict:
    """Input name -> digest (a list for a list of refs); anything without a digest is hashed."""
    return {name: _digest_of(value) for name, value in sorted(inputs.items())}


def parent_digests(inputs: dict) -> list[str]:
    flat = []
    for digest in input_digests(inputs).values():
        flat += digest if isinstance(digest, list) else [digest]
    return flat


def stage_key(name: str, module: str, spec, inputs: dict) -> str:
    """The cache key: stage name, spec digest (placement fields left out: ``model/digests.py: identity``),
    input digests, code version."""
    return json_digest({"stage": name, "spec": spec_digest(spec), "inputs": input_digests(inputs),
                        "code": code_version(module)})


def lineage(name: str, module: str, spec, inputs: dict, context: StageContext) -> Lineage:
    return Lineage(stage=name, spec_digest=spec_digest(spec), code_digest=code_version(module),
                   parents=parent_digests(inputs), recipe_name=context.recipe_name)


# --------------------------------------------------------------------------------------
# Producing a result: the one way every stage stores and publishes
# --------------------------------------------------------------------------------------

R = TypeVar("R", bound=Ref)


class Output(NamedTuple):
    """What a stage's work made: the folder to publish and the ref's fields besides uri, digest, lineage."""

    folder: Path
    fields: dict


def ref_key(stage: str, key: str) -> str:
    """Where a stage's ref is stored: by content (the key), so any recipe with the same work finds it."""
    return f"{stage}/{key[:32]}"


def stored_ref(store: ArtifactStore, key: str, cls: type[R]) -> R | None:
    """The ref stored at ``key`` if its artifact is still whole, else None: a stage's cache hit."""
    ref = store.read_ref(key, cls)
    return ref if ref is not None and store.verify(ref.uri, ref.digest) else None


def produce(ref_type: type[R], store: ArtifactStore, key: str, lineage: Lineage,
            make: Callable[[Path], Output], label: str = "") -> R:
    """key -> cached ref -> work folder -> ``make(work)`` -> publish -> digest -> ref.

    The work folder is ``<stage>/<label>-<key>`` (the label, e.g. the recipe name, is for people
    browsing the store); the ref is stored by key alone, after the artifact is published, so a
    reader that finds a ref finds a whole artifact."""
    stage = lineage.stage
    if (cached := stored_ref(store, ref_key(stage, key), ref_type)) is not None:
        return cached
    name = f"{label}-{key[:12]}" if label else key[:12]
    work = store.stage_dir(stage, name)
    output = make(work)
    inside = Path(output.folder).resolve().relative_to(work.resolve())  # published where it lies in the work folder
    uri = store.publish(output.folder, "/".join((stage, name, *inside.parts)))
    ref = ref_type(uri=uri, digest=store.published_digest(uri), lineage=lineage, **output.fields)
    store.write_ref(ref_key(stage, key), ref)
    return ref


def local_folder(store: ArtifactStore, ref: Ref) -> Path:
    """A local folder with the ref's files: the published artifact (downloaded once when remote),
    or the folder (or file) itself for an input the factory did not produce."""
    return Path(ref.uri) if ref.lineage.stage == EXTERNAL else store.fetch(ref.uri)
