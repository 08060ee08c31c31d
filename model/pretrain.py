"""Stages of ``model/``: prepare data (tokenizer + packed shards) and pretrain.

Both follow the stage contract (model/contract.py): ``run_<stage>(spec, inputs, store)``
returns a ref, and running it again with the same spec and inputs returns the stored ref
without recomputing anything, as long as its artifact is still whole.

A multi-process pretraining run (``train.num_processes > 1``) launches
``python -m torch.distributed.run --standalone --nproc_per_node=N -m model.pretrain LAUNCH``
and waits; each worker runs the same loop (model/train.py) under DDP.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

import model.architectures
import model.checkpoint
import model.data
import model.tokenizer
import model.train
from model import distributed
from model.architectures import format_parameters, get_family
from model.contract import (
    ArchSummary,
    ArtifactRef,
    DataRef,
    Lineage,
    ModelRef,
    Stage,
    code_digest,
    json_digest,
    stored_ref,
)
from model.data import PackedTokens, is_validation, iter_documents, open_source, pack_split, source_digest
from model.fsutil import atomic_write_text
from model.specs import DataSpec, ModelSpec, Section, TokenizerSpec, TrainSpec
from model.tokenizer import load_tokenizer, special_token_ids, tokenizer_digest, train_bpe
from model.train import StepCallback, train

MODEL_DIR = "model"
HISTORY_FILE = "training_history.json"  # in the model folder: per-step loss, lr, tokens/s, val loss


class DataStageSpec(Section):
    """What data preparation reads from a recipe."""

    data: DataSpec
    tokenizer: TokenizerSpec


DATA = Stage("data", ("model.data", "model.tokenizer", "model.pretrain"))


def data_key(spec: DataStageSpec) -> str:
    """The data stage's cache key: its spec, the source's contents and a given tokenizer's files."""
    inputs = {"source": source_digest(spec.data, open_source(spec.data))}
    if spec.tokenizer.path is not None:
        inputs["tokenizer"] = tokenizer_digest(Path(spec.tokenizer.path).expanduser())
    return DATA.key(spec, inputs)


class PretrainSpec(Section):
    """What pretraining reads from a recipe."""

    name: str
    model: ModelSpec
    train: TrainSpec


# Every family's module: editing any architecture invalidates pretraining caches (cheap to be safe).
PRETRAIN = Stage("pretrain", ("model.train", "model.checkpoint", "model.pretrain", "model.architectures",
                              "model.nemotron_h", "model.hymba", "model.hymba.modeling_hymba",
                              "model.hymba.configuration_hymba"))


# --------------------------------------------------------------------------------------
# Data: tokenizer and packed shards
# --------------------------------------------------------------------------------------


def run_prepare_data(data: DataSpec, tokenizer: TokenizerSpec, store, recipe_name: str = "") -> DataRef:
    """Tokenizer (trained or loaded) and packed train/validation shards, cached by
    (source digest, tokenizer digest, seq_len)."""
    source = open_source(data)
    src_digest = source_digest(data, source)
    tok_dir, tok_uri, tok_digest = _tokenizer_for(data, tokenizer, source, src_digest, store)

    key = f"data/{src_digest[:12]}-{tok_digest[:12]}-L{data.seq_len}"
    if (cached := stored_ref(store, key, DataRef)) is not None:
        return cached

    tok = load_tokenizer(tok_dir)
    out = store.stage_dir("data", key.split("/", 1)[1])
    splits = {}
    for split in ("train", "validation"):
        docs = (d for d in iter_documents(data, source) if is_validation(d, data.validation_fraction) == (split == "validation"))
        docs = tqdm(docs, desc=f"tokenize {split}", unit=" docs", leave=False, disable=not sys.stderr.isatty())
        token_lists = (tok(d.text, add_special_tokens=False)["input_ids"] for d in docs)
        splits[split] = pack_split(token_lists, tok.eos_token_id, tok.pad_token_id, data.seq_len, out, split)
        if splits[split]["rows"] == 0:
            raise ValueError(f"the {split} split of {data.source} is empty: add documents or change "
                             f"data.validation_fraction ({data.validation_fraction})")
    meta = {"source": data.source, "source_digest": src_digest, "tokenizer_digest": tok_digest,
            "seq_len": data.seq_len, "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id, "splits": splits}
    atomic_write_text(out / model.data.META_NAME, json.dumps(meta, indent=1))
    uri = store.publish(out, key)
    ref = DataRef(
        uri=uri, digest=store.published_digest(uri), tokenizer_uri=tok_uri, tokenizer_digest=tok_digest,
        source=data.source, source_digest=src_digest, seq_len=data.seq_len,
        train_tokens=splits["train"]["tokens"], validation_tokens=splits["validation"]["tokens"],
        lineage=Lineage(stage="data", spec_digest=json_digest({"data": data, "tokenizer": tokenizer}),
                        code_digest=code_digest(model.data), recipe_name=recipe_name),
    )
    store.write_ref(key, ref)
    return ref


def _tokenizer_for(data: DataSpec, spec: TokenizerSpec, source, src_digest: str, store) -> tuple[Path, str, str]:
    """(local folder, URI, digest) of the tokenizer, always published in the store (a URI every
    worker can fetch): a copy of the recipe's folder, or a BPE trained once per source."""
    if spec.path is not None:
        given = Path(spec.path).expanduser().resolve()
        key = f"tokenizers/given-{tokenizer_digest(given)[:16]}"
    else:
        key = f"tokenizers/bpe{spec.vocab_size}-{src_digest[:12]}-{json_digest(spec)[:8]}"
    if (cached := stored_ref(store, key, ArtifactRef)) is not None:
        folder = store.fetch(cached.uri)
        return folder, cached.uri, tokenizer_digest(folder)
    folder = store.stage_dir("tokenizers", key.split("/", 1)[1])
    if spec.path is not None:
        load_tokenizer(given).save_pretrained(folder)  # the tokenizer files only, not a model's weights
    else:
        texts = (d.text for d in iter_documents(data, source) if not is_validation(d, data.validation_fraction))
        print(f"training a {spec.vocab_size}-token byte-level BPE on {data.source} ...", file=sys.stderr)
        train_bpe(texts, spec.vocab_size, spec.min_frequency).save_pretrained(folder)
    uri = store.publish(folder, key)
    store.write_ref(key, ArtifactRef(uri=uri, digest=store.published_digest(uri), kind="tokenizer",
                                     lineage=Lineage(stage="tokenizer", spec_digest=json_digest(spec),
                                                     code_digest=code_digest(model.tokenizer), parents=[src_digest])))
    return folder, uri, tokenizer_digest(folder)


# --------------------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------------------


def build_model_config(spec: ModelSpec, tokenizer):
    """The recipe's architecture with the tokenizer's vocabulary and special tokens."""
    overrides = dict(spec.overrides) | {"vocab_size": len(tokenizer)}
    return get_family(spec.family).build_config(spec.preset, overrides, **special_token_ids(tokenizer))


def run_pretrain(spec: PretrainSpec, inputs: dict[str, DataRef], store,
                 callbacks: tuple[StepCallback, ...] = ()) -> ModelRef:
    """Pretrain a model from scratch on ``inputs['data']``; resumes from the newest checkpoint."""
    data_ref = inputs["data"]
    key = PRETRAIN.key(spec, inputs)
    tokenizer = load_tokenizer(store.fetch(data_ref.tokenizer_uri))
    config = build_model_config(spec.model, tokenizer)
    summary = get_family(spec.model.family).summarize(config)
    name = f"{spec.name}-{spec.model.family}-{format_parameters(summary['parameters'])}-{key[:8]}"
    ref_key = f"pretrain/{name}"

    if (cached := stored_ref(store, ref_key, ModelRef)) is not None:
        return cached

    work_dir = store.stage_dir("pretrain", name)
    data_dir = store.fetch(data_ref.uri)
    launch = {"spec": spec.model_dump(mode="json"), "data_dir": str(data_dir),
              "tokenizer_dir": str(store.fetch(data_ref.tokenizer_uri)), "work_dir": str(work_dir)}
    if spec.train.num_processes > 1 and not distributed.under_torchrun():
        distributed.launch_workers("model.pretrain", launch, spec.train.num_processes, work_dir)
    else:
        _train_and_save(launch, callbacks)

    history = json.loads((work_dir / MODEL_DIR / HISTORY_FILE).read_text())
    uri = store.publish(work_dir / MODEL_DIR, f"{ref_key}/{MODEL_DIR}")
    ref = ModelRef(
        uri=uri,
        digest=store.published_digest(uri),
        architecture=ArchSummary(**summary),
        lineage=Lineage(stage="pretrain", spec_digest=json_digest(spec), code_digest=PRETRAIN.code(),
                        parents=[data_ref.digest], recipe_name=spec.name),
        metrics=history["metrics"],
    )
    store.write_ref(ref_key, ref)
    return ref


def _train_and_save(launch: dict, callbacks: tuple[StepCallback, ...] = ()) -> None:
    """Build, train and save (rank 0) the model described by a launch record; run in every process."""
    spec = PretrainSpec.model_validate(launch["spec"])
    work_dir = Path(launch["work_dir"])
    tokenizer = load_tokenizer(launch["tokenizer_dir"])
    config = build_model_config(spec.model, tokenizer)
    torch.manual_seed(spec.train.seed)
    net = get_family(spec.model.family).model_class(config)
    result = train(net, PackedTokens(launch["data_dir"], "train"), spec.train, work_dir,
                   validation=PackedTokens(launch["data_dir"], "validation"), callbacks=callbacks,
                   description=f"pretrain {spec.name}")
    if int(os.environ.get("RANK", "0")) == 0:
        result["model"].save_pretrained(work_dir / MODEL_DIR)
        tokenizer.save_pretrained(work_dir / MODEL_DIR)
        metrics = {k: result[k] for k in ("steps", "tokens_seen", "final_loss", "val_loss")}
        atomic_write_text(work_dir / MODEL_DIR / HISTORY_FILE, json.dumps({"metrics": metrics, "history": result["history"]}))


if __name__ == "__main__":  # a torchrun worker
    _train_and_save(json.loads(Path(sys.argv[1]).read_text()))
    distributed.teardown(distributed.setup("auto"))
