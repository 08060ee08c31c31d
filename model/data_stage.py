"""The data stage: a tokenizer (trained on the source, or the recipe's own) and the source's
text cut into packed token shards.

    run(DataStageSpec, {}, store, context) -> DataRef

The key covers the whole spec (data and tokenizer sections), the source's contents and a given
tokenizer's files: changing any of them, ``validation_fraction`` included, makes new shards.
The tokenizer is an artifact of its own, published first, so every worker can fetch it by URI;
a BPE is trained once per source and reused by every sequence length.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from model.contract import (
    ArtifactRef,
    ArtifactStore,
    DataRef,
    Output,
    StageContext,
    lineage,
    produce,
    stage_key,
)
from model.spec import DataSpec, Section, TokenizerSpec

NAME = "data"
TOKENIZER = "tokenizer"  # the tokenizer's own artifact (published through the same helper)


class DataStageSpec(Section):
    """What data preparation reads from a recipe."""

    data: DataSpec
    tokenizer: TokenizerSpec


def _contents(spec: DataStageSpec, source) -> dict[str, str]:
    """What the shards are made of besides the spec: the source's contents, a given tokenizer's files."""
    from model.data import source_digest
    from model.tokenizer import tokenizer_digest

    contents = {"source": source_digest(spec.data, source)}
    if spec.tokenizer.path is not None:
        contents["tokenizer"] = tokenizer_digest(Path(spec.tokenizer.path).expanduser())
    return contents


def key(spec: DataStageSpec, inputs: dict) -> str:
    from model.data import open_source

    return stage_key(NAME, __name__, spec, inputs | _contents(spec, open_source(spec.data)))


def run(spec: DataStageSpec, inputs: dict, store: ArtifactStore, context: StageContext) -> DataRef:
    """Tokenizer and packed train/validation shards of ``spec.data``."""
    from model.data import open_source

    source = open_source(spec.data)
    contents = inputs | _contents(spec, source)

    def tokenize_and_pack(work: Path) -> Output:
        from tqdm.auto import tqdm

        from model.data import META_NAME, is_validation, iter_documents, pack_split
        from model.fsutil import atomic_write_text
        from model.tokenizer import load_tokenizer, tokenizer_digest

        tokenizer_ref = _tokenizer(spec, source, contents["source"], store, context)
        tokenizer_dir = store.fetch(tokenizer_ref.uri)
        tokenizer = load_tokenizer(tokenizer_dir)
        data = spec.data
        splits = {}
        for split in ("train", "validation"):
            docs = (d for d in iter_documents(data, source)
                    if is_validation(d, data.validation_fraction) == (split == "validation"))
            docs = tqdm(docs, desc=f"tokenize {split}", unit=" docs", leave=False, disable=not sys.stderr.isatty())
            token_lists = (tokenizer(d.text, add_special_tokens=False)["input_ids"] for d in docs)
            splits[split] = pack_split(token_lists, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id,
                                       data.seq_len, work, split)
            if splits[split]["rows"] == 0:
                raise ValueError(f"the {split} split of {data.source} is empty: add documents or change "
                                 f"data.validation_fraction ({data.validation_fraction})")
        meta = {"source": data.source, "source_digest": contents["source"],
                "tokenizer_digest": tokenizer_digest(tokenizer_dir), "seq_len": data.seq_len,
                "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id, "splits": splits}
        atomic_write_text(work / META_NAME, json.dumps(meta, indent=1))
        return Output(work, {"tokenizer_uri": tokenizer_ref.uri, "tokenizer_digest": meta["tokenizer_digest"],
                             "source": data.source, "source_digest": contents["source"], "seq_len": data.seq_len,
                             "train_tokens": splits["train"]["tokens"],
                             "validation_tokens": splits["validation"]["tokens"]})

    return produce(DataRef, store, stage_key(NAME, __name__, spec, contents),
                   lineage(NAME, __name__, spec, contents, context), tokenize_and_pack, label=context.recipe_name)


def _tokenizer(spec: DataStageSpec, source, source_digest: str, store: ArtifactStore,
               context: StageContext) -> ArtifactRef:
    """The recipe's tokenizer folder copied into the store, or a BPE trained on the training split
    (keyed on the tokenizer section and how documents are taken, not on the sequence length)."""
    from model.data import is_validation, iter_documents
    from model.tokenizer import load_tokenizer, tokenizer_digest, train_bpe

    given = Path(spec.tokenizer.path).expanduser().resolve() if spec.tokenizer.path is not None else None
    if given is not None:
        what, contents = {}, {"files": tokenizer_digest(given)}
    else:
        what = {"tokenizer": spec.tokenizer.model_dump(mode="json"),
                "documents": spec.data.model_dump(mode="json", exclude={"seq_len"})}
        contents = {"source": source_digest}

    def make(work: Path) -> Output:
        if given is not None:
            load_tokenizer(given).save_pretrained(work)  # the tokenizer files only, not a model's weights
        else:
            data = spec.data
            texts = (d.text for d in iter_documents(data, source) if not is_validation(d, data.validation_fraction))
            print(f"training a {spec.tokenizer.vocab_size}-token byte-level BPE on {data.source} ...", file=sys.stderr)
            train_bpe(texts, spec.tokenizer.vocab_size, spec.tokenizer.min_frequency).save_pretrained(work)
        return Output(work, {"kind": "tokenizer"})

    label = "given" if given is not None else f"bpe{spec.tokenizer.vocab_size}"
    return produce(ArtifactRef, store, stage_key(TOKENIZER, __name__, what, contents),
                   lineage(TOKENIZER, __name__, what, contents, context), make, label=label)
