"""Tokenizers: train a byte-level BPE with ``tokenizers``, or load an existing HF tokenizer.

A trained tokenizer is saved as an HF ``PreTrainedTokenizerFast`` folder, the same files
that go into every checkpoint, so ``AutoTokenizer.from_pretrained(checkpoint)`` works.
Special tokens take ids 0, 1, 2 (pad, bos, eos), which are also NemotronHConfig's defaults.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from model.digests import file_digest

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = [PAD, BOS, EOS]


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts``: every string round-trips exactly through it."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """An HF tokenizer folder (``tokenizer.json`` at least). A missing pad token becomes eos."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer in {path} has no eos token; packing needs one to separate documents")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_digest(path: str | Path) -> str:
    """The tokenizer's identity for caches: the digest of its ``tokenizer.json``."""
    return file_digest(Path(path) / "tokenizer.json")


def tokenization_of(path: str | Path) -> dict:
    """What decides the token ids (model vocabulary and merges, added tokens, normalizer,
    pre-tokenizer) without formatting details that a re-save may change."""
    import json

    spec = json.loads((Path(path) / "tokenizer.json").read_text())
    return {k: spec.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer")}


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The ids a model config needs so that generation pads and stops correctly."""
    return dict(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
