"""Tokenizers: train a byte-level BPE with ``tokenizers``, or load an existing HF tokenizer.

A trained tokenizer is saved as an HF ``PreTrainedTokenizerFast`` folder, the same files
that go into every checkpoint, so ``AutoTokenizer.from_pretrained(checkpoint)`` works.
Special tokens take ids 0, 1, 2 (pad, bos, eos), which are also NemotronHConfig's defaults, and
the chat roles' tags (``<|system|>``, ``<|user|>``, ``<|assistant|>``) the next ids, so a tag is
one token that no text can spell by accident.

Every tokenizer the factory writes carries a chat template (``CHAT_TEMPLATE`` unless the
tokenizer brought its own), so ``apply_chat_template``, ``transformers serve``'s chat endpoint,
vLLM and lm-eval's chat mode read a checkpoint's conversations the way it was trained on them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from model.digests import file_digest

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
ROLE_TAGS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TAGS]

# Each message is its role's tag, a newline, the content and a newline; an assistant's content
# ends with eos, so a model trained on it stops after its reply. ``sdg/output.py:
# render_conversation`` writes the same text without a tokenizer (a test holds them equal).
CHAT_TEMPLATE = (  # newlines as expressions: transformers renders with trim_blocks, which eats one after a tag
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def with_chat_template(tokenizer):
    """``tokenizer`` with ``CHAT_TEMPLATE`` where it has no chat template of its own."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


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
        additional_special_tokens=ROLE_TAGS,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """An HF tokenizer folder (``tokenizer.json`` at least), with a chat template (its own, else
    ``CHAT_TEMPLATE``). A missing pad token becomes eos."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer in {path} has no eos token; packing needs one to separate documents")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return with_chat_template(tokenizer)


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
