"""The sentencepiece tokenizer: reserved ids, exact round trip of code, deterministic training."""

from __future__ import annotations

import pytest

from services.data_prep.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    TokenizerError,
    load_tokenizer,
    special_ids,
    token_dtype,
    train_tokenizer,
    training_lines,
)
from shared.data.config import TokenizerConfig

from .conftest import code_doc, shakespeare_paragraphs


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return shakespeare_paragraphs(150) + [code_doc(i) for i in range(60)]


@pytest.fixture(scope="module")
def model(texts: list[str]) -> bytes:
    return train_tokenizer(texts, TokenizerConfig(vocab_size=400))


def test_reserved_ids(model: bytes) -> None:
    sp = load_tokenizer(model)
    assert special_ids(sp) == {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID} == {
        "pad": 0, "unk": 1, "bos": 2, "eos": 3
    }
    assert sp.vocab_size() == 400


def test_code_and_prose_round_trip_exactly(model: bytes, texts: list[str]) -> None:
    sp = load_tokenizer(model)
    samples = texts[:3] + texts[-3:] + ["\tif x:\n\t\treturn  'ünïcödé ✓ 漢字'\n\n\n    end"]
    for text in samples:
        assert sp.decode(sp.encode(text)) == text


def test_digits_are_split(model: bytes) -> None:
    sp = load_tokenizer(model)
    pieces = sp.encode("x = 12345", out_type=str)
    assert [p for p in pieces if p.strip("▁").isdigit()] == list("12345")


def test_training_is_deterministic(texts: list[str], model: bytes) -> None:
    assert train_tokenizer(texts, TokenizerConfig(vocab_size=400)) == model


def test_training_sample_is_seeded() -> None:
    lines = [f"line {i}" for i in range(1000)]
    a = training_lines(["\n".join(lines)], 100, seed=1)
    assert a == training_lines(["\n".join(lines)], 100, seed=1)
    assert a != training_lines(["\n".join(lines)], 100, seed=2)
    assert len(a) == 100 and a == sorted(a, key=lambda s: int(s.split()[1]))


def test_vocab_too_large_for_corpus_says_what_to_do() -> None:
    with pytest.raises(TokenizerError, match="vocab_size"):
        train_tokenizer(["tiny corpus"], TokenizerConfig(vocab_size=5000))


def test_too_many_required_characters_names_the_coverage_and_its_value() -> None:
    text = " ".join(chr(c) for c in range(0x4E00, 0x4E00 + 120))  # 120 distinct CJK characters
    with pytest.raises(TokenizerError, match="required_chars") as info:
        train_tokenizer([text] * 50, TokenizerConfig(vocab_size=300, character_coverage=0.9995))
    message = str(info.value)
    assert "tokenizer.vocab_size (now 300;" in message
    assert "tokenizer.character_coverage (now 0.9995)" in message
    assert "(now 300)" not in message


def test_token_dtype() -> None:
    assert token_dtype(65535) == "uint16"
    assert token_dtype(65536) == "uint32"
