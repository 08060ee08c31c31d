"""Every tokenizer the factory writes carries a chat template whose text the SDG records share."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from transformers import AutoTokenizer

from model.tokenizer import CHAT_TEMPLATE, EOS, ROLE_TAGS, load_tokenizer, train_bpe
from sdg.output import render_conversation

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "6"}]


def _bpe():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return train_bpe((p.read_text() for p in sorted(stdlib.glob("[a-c]*.py"))[:10]), 512)


def test_a_trained_tokenizer_renders_conversations_as_the_sdg_records_do(tmp_path):
    tokenizer = _bpe()
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)  # plain transformers, as any consumer reads it
    text = reloaded.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == render_conversation(CONVERSATION)
    assert text.count(EOS) == 2  # each assistant turn ends with eos: a trained model stops after its reply
    prompt = reloaded.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    # Role tags are single special tokens, never spelled by ordinary text's merges.
    for tag in ROLE_TAGS:
        assert len(reloaded(tag, add_special_tokens=False)["input_ids"]) == 1
    assert reloaded("<|user|>hi", add_special_tokens=False)["input_ids"][0] == reloaded.convert_tokens_to_ids("<|user|>")


def test_a_tokenizer_without_a_template_gets_the_factorys_and_one_with_its_own_keeps_it(tmp_path):
    tokenizer = _bpe()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "bare")
    assert not AutoTokenizer.from_pretrained(tmp_path / "bare").chat_template
    assert load_tokenizer(tmp_path / "bare").chat_template == CHAT_TEMPLATE
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(tmp_path / "own")
    assert load_tokenizer(tmp_path / "own").apply_chat_template(CONVERSATION[1:2], tokenize=False) == "[user] What is 2+2?"
