"""Tokenizers: GPT-2's exact ids offline, and the shipped Shakespeare BPE."""

from __future__ import annotations

from pathlib import Path

import pytest

from adasched.data.tokenizer import (
    gpt2_tokenizer,
    load_or_train_tokenizer,
    special_ids,
    train_bpe,
)
from adasched.errors import ConfigError
from tests.helpers import SHIPPED


def test_gpt2_tokenizer_gives_the_reference_ids_offline() -> None:
    tokenizer = gpt2_tokenizer()
    assert tokenizer("Hello world, this is a test.")["input_ids"] == [15496, 995, 11, 428, 318, 257, 1332, 13]
    assert len(tokenizer) == 50258
    assert special_ids(tokenizer) == (50256, 50257)


def test_shipped_bpe_round_trips_text_and_has_distinct_special_ids() -> None:
    tokenizer = load_or_train_tokenizer("bpe", SHIPPED / "tokenizer", 4096, None)
    text = "HAMLET.\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    eos, mask = special_ids(tokenizer)
    assert eos != mask and len(tokenizer) == 4096
    assert mask not in tokenizer(text)["input_ids"]


def test_bpe_is_trained_once_then_loaded(tmp_path: Path) -> None:
    texts = ["the cat sat on the mat"] * 50
    first = load_or_train_tokenizer("bpe", tmp_path / "tok", 280, lambda: texts)
    again = load_or_train_tokenizer("bpe", tmp_path / "tok", 280, None)
    assert first.get_vocab() == again.get_vocab()


def test_bad_tokenizer_settings_fail_by_name() -> None:
    with pytest.raises(ConfigError, match="tokenizer.kind='sentencepiece'"):
        load_or_train_tokenizer("sentencepiece", None, 100, None)
    with pytest.raises(ConfigError, match="tokenizer.vocab_size=100"):
        train_bpe(["a b c"], 100)
