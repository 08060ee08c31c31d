"""Tokenizer, sources, split and packing: every token once per epoch, caches reused."""

from __future__ import annotations

import json

import pytest

import model.data
import model.tokenizer
from model.data import PackedTokens, is_validation, iter_documents, open_source
from model.spec import DataSpec, TokenizerSpec
from model.tokenizer import load_tokenizer, train_bpe
from model.train import global_batch
from store.local import LocalStore

from .conftest import prepare_data


def test_bpe_round_trips_text_exactly(corpus_dir):
    texts = [p.read_text() for p in sorted(corpus_dir.iterdir())]
    tokenizer = train_bpe(texts, vocab_size=400)
    assert len(tokenizer) == 400
    for text in [texts[0][:2000], "  def f(x):\n\treturn x  # ünïcødé ✓ 日本語\n\n", "", "\x00\x7f"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


def test_split_is_deterministic_and_near_the_fraction(corpus_dir):
    spec = DataSpec(source=str(corpus_dir), validation_fraction=0.25)
    docs = list(iter_documents(spec, open_source(spec)))
    first = [is_validation(d, 0.25) for d in docs]
    assert first == [is_validation(d, 0.25) for d in docs]
    assert 0.1 < sum(first) / len(docs) < 0.45


def test_packing_uses_every_token_exactly_once_per_epoch(corpus_dir, tmp_path):
    store = LocalStore(tmp_path)
    spec = DataSpec(source=str(corpus_dir), seq_len=64, validation_fraction=0.1)
    ref = prepare_data(spec, TokenizerSpec(vocab_size=512), store)
    train = PackedTokens(ref.uri, "train")
    tokenizer = load_tokenizer(ref.tokenizer_uri)

    # The stream the shards must hold: each training document's ids, then EOS, in source order.
    expected = []
    for doc in iter_documents(spec, open_source(spec)):
        if not is_validation(doc, spec.validation_fraction):
            expected += tokenizer(doc.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert train.tokens == len(expected) == ref.train_tokens

    # One epoch of the training order visits every row once; the real tokens of the rows,
    # in row order, are exactly that stream.
    batch = 8
    steps = -(-len(train) // batch)
    order = [r for step in range(steps) for r in global_batch(step, batch, len(train), seed=0)][: len(train)]
    assert sorted(order) == list(range(len(train)))
    ids, valid = train.batch(range(len(train)))
    assert ids[valid].tolist() == expected
    assert not valid[:-1].logical_not().any()  # only the last row is padded


def test_second_run_reuses_tokenizer_and_shards(corpus_dir, tmp_path, monkeypatch):
    store = LocalStore(tmp_path)
    spec, tok = DataSpec(source=str(corpus_dir), seq_len=64, validation_fraction=0.1), TokenizerSpec(vocab_size=512)
    first = prepare_data(spec, tok, store)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(model.tokenizer, "train_bpe", fail)
    monkeypatch.setattr(model.data, "pack_split", fail)
    assert prepare_data(spec, tok, store) == first
    # A changed sequence length reuses the tokenizer but packs again.
    monkeypatch.undo()
    monkeypatch.setattr(model.tokenizer, "train_bpe", fail)
    other = prepare_data(DataSpec(source=str(corpus_dir), seq_len=32, validation_fraction=0.1), tok, store)
    assert other.tokenizer_digest == first.tokenizer_digest and other.uri != first.uri


def test_a_damaged_shard_cache_is_rebuilt(corpus_dir, tmp_path):
    store = LocalStore(tmp_path)
    spec, tok = DataSpec(source=str(corpus_dir), seq_len=64, validation_fraction=0.1), TokenizerSpec(vocab_size=512)
    first = prepare_data(spec, tok, store)
    shard = next(p for p in (tmp_path / "data").rglob("train-*.bin"))
    shard.write_bytes(shard.read_bytes()[:100])
    again = prepare_data(spec, tok, store)
    assert again.digest == first.digest
    assert shard.stat().st_size > 100


def _texts(spec: DataSpec) -> list[str]:
    return [d.text for d in iter_documents(spec, open_source(spec))]


def test_jsonl_parquet_and_text_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"document {i} " * (i + 1), "id": i} for i in range(5)]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "docs.parquet")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("# A\nprose")
    (tmp_path / "notes" / "b.bin").write_bytes(b"\x00skipped")

    expected = [r["text"] for r in rows]
    assert _texts(DataSpec(source=str(tmp_path / "docs.jsonl"))) == expected
    assert _texts(DataSpec(source=str(tmp_path / "docs.parquet"))) == expected
    assert _texts(DataSpec(source=str(tmp_path / "notes"))) == ["# A\nprose"]
    assert _texts(DataSpec(source=str(tmp_path / "docs.jsonl"), max_documents=2)) == expected[:2]
    with pytest.raises(KeyError):
        _texts(DataSpec(source=str(tmp_path / "docs.jsonl"), text_field="body"))


def test_builtin_corpus_is_the_standard_library():
    spec = DataSpec(source="builtin:stdlib", max_documents=50)
    docs = list(iter_documents(spec, open_source(spec)))
    assert len(docs) == 50 and all(d.id.startswith("stdlib/") for d in docs)
    assert not any("/test/" in d.id for d in iter_documents(DataSpec(), open_source(DataSpec())))


def test_hugging_face_dataset_source(tmp_path):
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "my_dataset"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{"text": "alpha"}, {"text": "beta"}]), folder / "train.parquet")
    assert _texts(DataSpec(source=f"hf:{folder}")) == ["alpha", "beta"]


def test_s3_prefix_source(s3_env, tmp_path):
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="corpus")
    s3.put_object(Bucket="corpus", Key="text/a.txt", Body=b"first document")
    s3.put_object(Bucket="corpus", Key="text/b.jsonl", Body=b'{"text": "second"}\n{"text": "third"}\n')
    s3.put_object(Bucket="corpus", Key="other/c.txt", Body=b"not under the prefix")
    spec = DataSpec(source="s3://corpus/text/")
    assert _texts(spec) == ["first document", "second", "third"]
    before = open_source(spec).fingerprint()
    s3.put_object(Bucket="corpus", Key="text/a.txt", Body=b"changed")
    assert open_source(spec).fingerprint() != before


def test_a_vocabulary_past_65536_entries_keeps_every_id(tmp_path):
    """Nemotron-H's 131,072-token vocabulary: ids above 65,535 must survive packing exactly
    (uint16 shards would raise on numpy 2 and wrap on numpy 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3} | {f"w{i}": i + 4 for i in range(70_000)}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(tmp_path / "tokenizer")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    documents = [" ".join(f"w{(d * 7919 + j * 104_729) % 70_000}" for j in range(50)) for d in range(40)]
    for d, text in enumerate(documents):
        (corpus / f"doc{d}.txt").write_text(text)

    spec = DataSpec(source=str(corpus), seq_len=32, validation_fraction=0.1)
    ref = prepare_data(spec, TokenizerSpec(path=str(tmp_path / "tokenizer")), LocalStore(tmp_path / "store"))
    tokenizer = load_tokenizer(ref.tokenizer_uri)
    assert len(tokenizer) > 2**16
    expected = []
    for doc in iter_documents(spec, open_source(spec)):
        if not is_validation(doc, spec.validation_fraction):
            expected += tokenizer(doc.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert max(expected) > 2**16
    train = PackedTokens(ref.uri, "train")
    ids, valid = train.batch(range(len(train)))
    assert ids[valid].tolist() == expected
