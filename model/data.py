"""Training text: sources, the train/validation split, and packed token shards.

    source --documents--> split by document hash --tokenize--> [doc ids, EOS, doc ids, EOS, ...]
           --pack--> fixed-length rows of seq_len tokens --> memory-mapped shard files

Packing concatenates documents with an EOS after each one and cuts the stream into rows of
``seq_len`` tokens; only the last row is padded, so every token is used exactly once per
epoch. Shards are keyed by (source digest, tokenizer digest, seq_len) and reused.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.digests import combine_digests, file_digest, json_digest
from model.spec import DOCUMENT_SUFFIXES, DataSpec

TABLE_SUFFIXES = {".jsonl", ".parquet"}
TEXT_SUFFIXES = DOCUMENT_SUFFIXES - TABLE_SUFFIXES
_STDLIB_TEST_DIRS = {"test", "tests", "idle_test"}


@dataclass(frozen=True)
class Document:
    id: str
    text: str


# --------------------------------------------------------------------------------------
# Sources: each knows a cheap fingerprint of its contents and how to iterate documents.
# --------------------------------------------------------------------------------------


class FileSource:
    """Local files: the built-in standard-library corpus, or a user's file or folder."""

    def __init__(self, files: list[Path] | tuple[Path, ...], root: Path, text_field: str, label: str):
        self.files, self.root, self.text_field, self.label = files, root, text_field, label
        if not files:
            raise ValueError(f"no .txt/.md/.rst/.py/.jsonl/.parquet files in {root}")

    def fingerprint(self) -> str:
        # Content, not mtimes: a copied corpus keeps its cache, an edited one does not.
        return combine_digests({self._name(p): file_digest(p) for p in self.files})

    def documents(self) -> Iterator[Document]:
        for path in self.files:
            yield from _parse(self._name(path), path.read_bytes(), path.suffix, self.text_field)

    def _name(self, path: Path) -> str:
        return f"{self.label}/{path.relative_to(self.root).as_posix()}" if path != self.root else self.label


class HFSource:
    """A Hugging Face dataset by name (``hf:NAME`` or ``hf:NAME:SPLIT``); offline when cached."""

    def __init__(self, name: str, split: str, text_field: str):
        try:
            import datasets
        except ImportError as e:
            raise ImportError("hf: sources need the `datasets` package: pip install 'hybrid-model-factory[hf]'") from e
        self.dataset = datasets.load_dataset(name, split=split)
        if text_field not in self.dataset.column_names:
            raise ValueError(f"dataset {name} has no column {text_field!r}; columns: {self.dataset.column_names}")
        self.name, self.text_field = name, text_field

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.name}:{self.dataset._fingerprint}".encode()).hexdigest()

    def documents(self) -> Iterator[Document]:
        for i, row in enumerate(self.dataset):
            yield Document(f"{self.name}/{i}", row[self.text_field])


class S3Source:
    """Every object under ``s3://bucket/prefix``, parsed by suffix like local files.

    boto3 is configured the standard way (credential chain, ``AWS_ENDPOINT_URL``).
    """

    def __init__(self, uri: str, text_field: str):
        import boto3

        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        self.bucket, self.prefix, self.text_field = bucket, prefix, text_field
        self.client = boto3.client("s3")
        paginator = self.client.get_paginator("list_objects_v2")
        self.objects = sorted(
            (obj["Key"], obj["ETag"])
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
            for obj in page.get("Contents", [])
            if Path(obj["Key"]).suffix in TEXT_SUFFIXES | TABLE_SUFFIXES
        )
        if not self.objects:
            raise ValueError(f"no text objects under {uri}")

    def fingerprint(self) -> str:
        return combine_digests(dict(self.objects))  # ETags change whenever an object does

    def documents(self) -> Iterator[Document]:
        for key, _ in self.objects:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            yield from _parse(f"s3://{self.bucket}/{key}", body, Path(key).suffix, self.text_field)


def _parse(name: str, data: bytes, suffix: str, text_field: str) -> Iterator[Document]:
    if suffix == ".jsonl":
        for i, line in enumerate(data.decode("utf-8").splitlines()):
            if line.strip():
                yield Document(f"{name}:{i}", json.loads(line)[text_field])
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        column = pq.read_table(io.BytesIO(data), columns=[text_field]).column(text_field)
        for i, text in enumerate(column.to_pylist()):
            yield Document(f"{name}:{i}", text)
    else:
        yield Document(name, data.decode("utf-8", errors="replace"))


@functools.lru_cache(maxsize=2)
def _stdlib_files(with_tests: bool) -> tuple[Path, tuple[Path, ...]]:
    # Listed once per process (the flow's cache key and the stage both open the source), and
    # without walking site-packages, which may hold more files than the standard library itself.
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"site-packages", "__pycache__"} | (set() if with_tests else _STDLIB_TEST_DIRS)
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in skipped]
        files += [Path(folder) / name for name in names if name.endswith(".py")]
    return root, tuple(sorted(files))


def open_source(spec: DataSpec):
    if spec.source.startswith("builtin:"):
        root, files = _stdlib_files(with_tests=spec.source == "builtin:stdlib-with-tests")
        return FileSource(files, root, spec.text_field, "stdlib")
    if spec.source.startswith("hf:"):
        name, _, split = spec.source.removeprefix("hf:").partition(":")
        return HFSource(name, split or "train", spec.text_field)
    if spec.source.startswith("s3://"):
        return S3Source(spec.source, spec.text_field)
    path = Path(spec.source).expanduser().resolve()
    if path.is_file():
        return FileSource([path], path, spec.text_field, path.name)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES | TABLE_SUFFIXES)
    return FileSource(files, path, spec.text_field, path.name)


def source_digest(spec: DataSpec, source) -> str:
    """What the token cache is keyed on: the source's contents and how documents are taken."""
    return json_digest(dict(fingerprint=source.fingerprint(), max_documents=spec.max_documents,
                            text_field=spec.text_field))


def iter_documents(spec: DataSpec, source) -> Iterator[Document]:
    for i, doc in enumerate(source.documents()):
        if spec.max_documents is not None and i >= spec.max_documents:
            return
        if doc.text:
            yield doc


def is_validation(doc: Document, fraction: float) -> bool:
    """Deterministic split on the hash of the text: the same document always lands on the
    same side, on any machine, and duplicates never straddle the split."""
    bucket = int.from_bytes(hashlib.sha256(doc.text.encode()).digest()[:8], "big")
    return bucket / 2**64 < fraction


# --------------------------------------------------------------------------------------
# Packing and shards
# --------------------------------------------------------------------------------------

SHARD_TOKENS = 1 << 26  # 64M tokens (128 MiB as uint16) per shard file
META_NAME = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id of a ``vocab_size``-entry vocabulary:
    uint16 up to 65,536 entries, uint32 beyond (Nemotron-H's 131,072)."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def pack_split(token_lists, vocab_size: int, eos_id: int, pad_id: int, seq_len: int, out_dir: Path,
               split: str) -> dict:
    """Write ``[doc, EOS, doc, EOS, ...]`` as rows of ``seq_len`` tokens into shard files.

    ``token_lists`` yields one list of ids per document, each id below ``vocab_size`` (the
    tokenizer's length, special tokens included). Returns the split's metadata.
    """
    dtype = token_dtype(vocab_size)
    shard_size = max(1, SHARD_TOKENS // seq_len) * seq_len
    shards, pending, pending_len, real_tokens = [], [], 0, 0

    def write_shard(tokens: np.ndarray):
        name = f"{split}-{len(shards):05d}.bin"
        tokens.tofile(out_dir / name)
        shards.append({"file": name, "rows": len(tokens) // seq_len})

    for ids in token_lists:
        pending.append(np.asarray([*ids, eos_id], dtype=dtype))
        pending_len += len(ids) + 1
        real_tokens += len(ids) + 1
        if pending_len >= shard_size:
            stream = np.concatenate(pending)
            while len(stream) >= shard_size:
                write_shard(stream[:shard_size])
                stream = stream[shard_size:]
            pending, pending_len = [stream], len(stream)
    if pending_len:
        stream = np.concatenate(pending)
        padding = np.full(-len(stream) % seq_len, pad_id, dtype=dtype)  # only the very last row is padded
        write_shard(np.concatenate([stream, padding]))
    return {"shards": shards, "rows": sum(s["rows"] for s in shards), "tokens": real_tokens,
            "dtype": np.dtype(dtype).name}


class PackedTokens:
    """Memory-mapped packed rows of one split: ``len`` rows, each ``seq_len`` token ids."""

    def __init__(self, folder: Path, split: str):
        folder = Path(folder)
        meta = json.loads((folder / META_NAME).read_text())
        info = meta["splits"][split]
        self.seq_len, self.pad_id, self.eos_id = meta["seq_len"], meta["pad_id"], meta["eos_id"]
        self.tokens = info["tokens"]
        self._shards = [
            np.memmap(folder / s["file"], dtype=info["dtype"], mode="r").reshape(s["rows"], self.seq_len)
            for s in info["shards"]
        ]
        self._starts = np.cumsum([0] + [s.shape[0] for s in self._shards])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def row(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        return self._shards[shard][index - self._starts[shard]]

    def valid_tokens(self, index: int) -> int:
        """Real (non-padding) tokens in row ``index``: all of them except in the last row."""
        return self.tokens - (len(self) - 1) * self.seq_len if index == len(self) - 1 else self.seq_len

    def target_count(self, indices) -> int:
        """Next-token targets in these rows (a row of n real tokens has n - 1)."""
        return sum(self.valid_tokens(int(i)) - 1 for i in indices)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (len(indices), seq_len) int64 and a mask of the real (non-padding) tokens.

        The mask is positional, so it is right even when the tokenizer pads with its EOS id."""
        input_ids = torch.from_numpy(np.stack([self.row(int(i)) for i in indices]).astype(np.int64))
        lengths = torch.tensor([self.valid_tokens(int(i)) for i in indices])
        valid = torch.arange(self.seq_len)[None, :] < lengths[:, None]
        return input_ids, valid


def read_meta(folder: Path) -> dict:
    return json.loads((Path(folder) / META_NAME).read_text())
