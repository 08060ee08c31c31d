"""The SDG stage: synthetic SFT and preference datasets (``sdg/pipeline.py``) in the artifact store.

    run(SDGSpec, {"generator", "reward_model", "judge": refs (optional)}, store, context) -> ArtifactRef

``inputs`` maps ``generator``, ``reward_model`` and ``judge`` to refs (anything with ``uri``
and ``digest``: a ModelRef, or ``checkpoint_ref(folder)``) for the checkpoints the spec names;
the caller resolves ``teacher``, ``models:/`` and ``s3://`` names (``SDGSpec.checkpoints``). A
local folder named in the spec needs no ref.

The key is the spec and the identities of the generator, reward model and judge (checkpoint
digests or endpoint URLs), so a cached run loads no model at all. The records (every
generation, verdict and score) live in one working folder per recipe, shared by every version
of its sdg section: a run with new thresholds or output formats generates nothing again.
"""

from __future__ import annotations

from pathlib import Path

from model.contract import (
    EXTERNAL,
    ArtifactRef,
    ArtifactStore,
    Lineage,
    Output,
    StageContext,
    Summary,
    lineage,
    local_folder,
    produce,
    stage_key,
)
from sdg.spec import TEACHER, SDGSpec

NAME = "sdg"
TAGS = ("gpu",)


def checkpoint_ref(folder: str | Path) -> ArtifactRef:
    """A ref for a checkpoint folder the caller resolved (a registry download, a local folder)."""
    from model.digests import folder_digest

    folder = Path(folder).expanduser().resolve()
    return ArtifactRef(uri=str(folder), digest=folder_digest(folder), kind="checkpoint",
                       lineage=Lineage(stage=EXTERNAL, spec_digest="", code_digest=""))


def _named_folder(name: str, uri: str) -> Path:
    """A checkpoint the spec names by path; other names need a ref from the caller."""
    if uri.startswith(("models:/", "s3://")) or uri == TEACHER:
        raise ValueError(f"sdg: {name} {uri!r} must be resolved by the caller and passed as inputs[{name!r}] "
                         "(registry.models.resolve_checkpoint, then sdg.sdg_stage.checkpoint_ref)")
    folder = Path(uri).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"sdg: {name} {folder} is not a checkpoint folder (no config.json)")
    return folder


def identities(spec: SDGSpec, inputs: dict) -> dict[str, str]:
    """What produced each role's records: an endpoint's URL and model, or a checkpoint's
    digest (from its ref, without fetching it)."""
    from sdg.backends import checkpoint_identity

    def identity(name: str, generator) -> str:
        if generator is not None and generator.endpoint is not None:
            return f"endpoint:{generator.endpoint.rstrip('/')}#{generator.endpoint_model or 'default'}"
        if (ref := inputs.get(name)) is not None:
            return f"checkpoint:{ref.digest}"
        return checkpoint_identity(_named_folder(name, spec.checkpoints()[name]))

    ids = {"generator": identity("generator", spec.generator)}
    if spec.scorer.reward_model is not None:
        ids["reward_model"] = identity("reward_model", None)
    if spec.scorer.judge is not None:
        ids["judge"] = identity("judge", spec.scorer.judge)
    return ids


def _folders(spec: SDGSpec, inputs: dict, store: ArtifactStore) -> dict[str, Path]:
    """A local folder for every checkpoint the spec names (refs fetched from the store)."""
    folders = {}
    for name, uri in spec.checkpoints().items():
        if (ref := inputs.get(name)) is None:
            folders[name] = _named_folder(name, uri)
        else:
            folders[name] = local_folder(store, ref)
            if not (folders[name] / "config.json").is_file():
                raise FileNotFoundError(f"sdg: {name} {ref.uri} is not a checkpoint folder (no config.json)")
    return folders


def key(spec: SDGSpec, inputs: dict) -> str:
    return stage_key(NAME, __name__, spec, identities(spec, inputs))


def run(spec: SDGSpec, inputs: dict, store: ArtifactStore, context: StageContext) -> ArtifactRef:
    """Generate, score, filter and publish the SFT and preference datasets; resumable per record."""
    ids = identities(spec, inputs)

    def generate(work: Path) -> Output:
        if spec.code is not None:  # before anything is generated: code problems need the sandbox here
            from sdg.verifiers import require_sandbox

            require_sandbox(spec.verify.sandbox)
        from sdg.output import write_datasets
        from sdg.pipeline import (
            Run,
            build_prompts,
            check_responses,
            generate_responses,
            preference_rows,
            rank_pairs,
            score_responses,
            sft_rows,
        )
        from sdg.shards import RecordStore

        records = store.stage_dir(NAME, context.recipe_name) / "records"  # shared by every version of the section
        sdg = Run(spec, _folders(spec, inputs, store), ids, RecordStore(records),
                  lambda step, done, total: context.progress(done / total) if total else None, context.device)
        try:
            prompts = build_prompts(spec, sdg)
            if not prompts:
                raise ValueError("sdg: the pipelines produced no prompt (the generator's lists parsed to nothing); "
                                 "give seed topics, keywords or a problems_file, or a stronger generator")
            by_prompt = generate_responses(spec, sdg, prompts)
            check_responses(spec, sdg, prompts, by_prompt)
            score_responses(spec, sdg, prompts, by_prompt)
            pairs = rank_pairs(spec, sdg, prompts, by_prompt)
            sft = sft_rows(spec, sdg, prompts, by_prompt)
            preference = preference_rows(spec, sdg, pairs)
        finally:
            sdg.close()
        files = write_datasets(work, sft, preference, sdg.stats, tuple(spec.formats))
        return Output(work, {"kind": "sdg_dataset",
                             "metadata": {"files": files, "sft_rows": len(sft), "preference_rows": len(preference),
                                          "generator": ids["generator"], "reward_model": ids.get("reward_model", ""),
                                          "judge": ids.get("judge", ""), "stats": sdg.stats}})

    parents = {name: identity.removeprefix("checkpoint:") for name, identity in ids.items()
               if identity.startswith("checkpoint:")}
    return produce(ArtifactRef, store, key(spec, inputs), lineage(NAME, __name__, spec, parents, context), generate,
                   label=context.recipe_name)


def summary(ref: ArtifactRef, store: ArtifactStore) -> Summary:
    return Summary(notes=f"{ref.metadata.get('sft_rows')} SFT rows, {ref.metadata.get('preference_rows')} preference pairs")
