"""The sentencepiece tokenizer: reserved ids, exact round trip of code, deterministic training."""

from __future__ import annotations

import io

import pytest
import sentencepiece as spm

from services.data_prep.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    DocumentEncoder,
    TokenizerError,
    load_tokenizer,
    model_spec,
    newline_ids,
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


def test_line_by_line_encoding_gives_exactly_sp_encode_ids(model: bytes, texts: list[str]) -> None:
    sp = load_tokenizer(model)
    assert model_spec(sp) == {"model_type": "bpe", "normalizer": "identity", "add_dummy_prefix": False,
                              "remove_extra_whitespaces": False}
    encoder = DocumentEncoder(sp)
    assert encoder.by_line and encoder.newline == [sp.piece_to_id("<0x0A>")]
    tricky = ["", "\n", "\n\nx\n", "a \n b", "  \n\t\n", "tail  ", "x\n" * 50, "ünï\ncödé ✓\n漢字", "\r\nwin\r\n"]
    docs = texts + tricky + texts[:5]  # repeated documents and lines share the cache
    expected = sp.encode(docs)
    assert encoder.encode(docs) == expected
    flat, lengths = encoder.encode_flat(docs, EOS_ID)
    assert flat == [t for ids in expected for t in [*ids, EOS_ID]] and lengths == [len(x) + 1 for x in expected]


def test_models_that_are_not_line_local_are_encoded_whole(texts: list[str]) -> None:
    unigram = load_tokenizer(train_tokenizer(texts, TokenizerConfig(vocab_size=400, model_type="unigram")))
    assert model_spec(unigram)["model_type"] == "unigram" and newline_ids(unigram) is None
    lines = [line for t in texts for line in t.split("\n") if line.strip()]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, vocab_size=400,
                                   model_type="bpe", minloglevel=2)  # sentencepiece's defaults: nmt_nfkc
    default = spm.SentencePieceProcessor(model_proto=out.getvalue())
    assert model_spec(default) == {"model_type": "bpe", "normalizer": "nmt_nfkc", "add_dummy_prefix": True,
                                   "remove_extra_whitespaces": True}
    for sp in (unigram, default):
        encoder = DocumentEncoder(sp)
        assert not encoder.by_line
        expected = sp.encode(texts[:20])
        assert encoder.encode(texts[:20]) == expected
        assert encoder.encode_flat(texts[:20], EOS_ID) == (
            [t for ids in expected for t in [*ids, EOS_ID]], [len(x) + 1 for x in expected]
        )


def test_token_dtype() -> None:
    assert token_dtype(65535) == "uint16"
    assert token_dtype(65536) == "uint32"
