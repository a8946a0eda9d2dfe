"""RAG boundary tokens through every export: sentencepiece, the HF tokenizer, the GGUF vocabulary,
rag_template.json (signed) and the model card.

One RAG-packed dataset (local retriever) gives the tokenizer, with `<ctx>`, `</ctx>`, `<doc>` as
user-defined symbols, and the manifest the template comes from; a one-layer model of that
vocabulary is exported (native, hf, gguf f32)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from services.exporter.config import ExportConfig
from services.exporter.export import ExportError, export_checkpoint, rag_template_of
from services.exporter.hf import USER_DEFINED, user_defined_pieces
from services.exporter.verify import verify_export
from shared.checkpoint import save_checkpoint
from shared.data.config import RAG_BOUNDARY_TOKENS
from shared.model import Llama, model_preset
from tests.data_prep.conftest import write_corpus
from tests.rag.conftest import prepare, rag_config

KEY = "test-signing-key"
RAG_TEXT = "<ctx>def add(x, y):\n    return x + y</ctx><ctx>All: speak.</ctx><doc>First Citizen: hear me"
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ragds")
    write_corpus(root, n_prose=30, n_code=20)
    return prepare(root, rag_config(k=2, seq_len=64, context_budget=0.4)).manifest_path


@pytest.fixture(scope="module")
def tokenizer(dataset: Path) -> Path:
    return dataset.parent / "tokenizer.model"


@pytest.fixture(scope="module")
def exported(dataset: Path, tokenizer: Path, tmp_path_factory):
    torch.manual_seed(0)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    config = model_preset("tiny", vocab_size=sp.vocab_size(), n_layer=1, d_model=64, ffn_hidden=128,
                          max_seq_len=128)
    model = Llama(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    info = save_checkpoint(tmp_path_factory.mktemp("ckpt"), 1, state,
                           {"step": 1, "model_config": config.model_dump(mode="json")}, metric=1.0,
                           meta={"reason": "final", "dataset_version": "ds-rag", "run_id": "run-rag"})
    cfg = ExportConfig(gguf_types=["f32"], watermark={"enabled": False})
    retrieval = {"loss_without": 3.0, "loss_with": 2.5, "loss_random": 2.9, "gain": 0.5, "control_gain": 0.1}
    return export_checkpoint(info.path, tokenizer, ["native", "hf", "gguf"], tmp_path_factory.mktemp("exp"),
                             run_id="run-rag", dataset_version="ds-rag", config_hash=None, signing_key=KEY,
                             config=cfg, rag_template=rag_template_of(dataset), retrieval=retrieval), info.path


def test_boundary_tokens_are_user_defined_pieces_that_round_trip_through_sentencepiece(tokenizer):
    from sentencepiece import sentencepiece_model_pb2

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.read_bytes())
    pieces = user_defined_pieces(tokenizer)
    assert list(pieces) == list(RAG_BOUNDARY_TOKENS)
    for piece, i in pieces.items():
        assert proto.pieces[i].type == USER_DEFINED
        assert sp.encode(piece) == [i] and sp.id_to_piece(i) == piece and sp.decode([i]) == piece
    ids = sp.encode(RAG_TEXT)
    assert [i for i in ids if i in pieces.values()] == [pieces[p] for p in
                                                        ("<ctx>", "</ctx>", "<ctx>", "</ctx>", "<doc>")]
    assert sp.decode(ids) == RAG_TEXT


def test_rag_template_is_written_signed_and_read_by_cyrex(exported, dataset):
    from cyrex_example.rag import load_template

    result, _ = exported
    manifest = json.loads((dataset).read_text())
    expected = {"chunk_open": "<ctx>", "chunk_close": "</ctx>", "doc_marker": "<doc>", "k": 2,
                "context_budget": 0.4, "seq_len": manifest["rag"]["seq_len"]}
    assert json.loads((result.path / "rag_template.json").read_text()) == expected
    assert "rag_template.json" in result.manifest["files"] and result.manifest["rag_template"] == "rag_template.json"
    template, note = load_template(result.path, result.manifest)
    assert template is not None and template.model_dump(exclude_none=True) == expected, note
    assert verify_export(result.path, KEY, check_loads=False).ok
    # Tampering with the template breaks the signed digests.
    path = result.path / "rag_template.json"
    original = path.read_bytes()
    try:
        path.write_text(json.dumps({**expected, "k": 64}))
        assert not verify_export(result.path, KEY, check_loads=False).ok
    finally:
        path.write_bytes(original)


def test_model_card_shows_the_prompt_template_and_the_retrieval_gain(exported):
    result, _ = exported
    card = result.model_card_path.read_text()
    assert "## Retrieval-augmented prompts" in card
    assert "<ctx>chunk 1</ctx><ctx>chunk 2</ctx><doc>your text" in card
    assert "up to 2 chunks" in card and "40%" in card
    assert "| gain | 0.5 | nats/token | without - with |" in card
    assert "| control_gain | 0.1 | nats/token | without - random |" in card


def test_hf_tokenizer_declares_boundary_tokens_special_with_the_sentencepiece_ids(exported, tokenizer):
    from transformers import AutoTokenizer

    result, _ = exported
    assert result.parity["hf"]["user_defined_identical"] is True and result.parity["hf"]["user_defined_tokens"] == 3
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    tok = AutoTokenizer.from_pretrained(result.path / "hf")
    assert list(tok.extra_special_tokens) == list(RAG_BOUNDARY_TOKENS)
    for piece in RAG_BOUNDARY_TOKENS:
        assert tok.encode(piece, add_special_tokens=False) == [sp.piece_to_id(piece)]
    assert tok.encode(RAG_TEXT, add_special_tokens=False) == sp.encode(RAG_TEXT)
    assert tok.decode(sp.encode(RAG_TEXT)) == RAG_TEXT
    assert tok.decode(sp.encode(RAG_TEXT), skip_special_tokens=True) == sp.decode(
        [i for i in sp.encode(RAG_TEXT) if sp.id_to_piece(i) not in RAG_BOUNDARY_TOKENS])


def test_gguf_vocabulary_marks_boundary_tokens_user_defined(exported, tokenizer):
    import gguf

    result, _ = exported
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    reader = gguf.GGUFReader(str(result.path / "gguf" / "model-f32.gguf"))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    for piece in RAG_BOUNDARY_TOKENS:
        i = sp.piece_to_id(piece)
        assert tokens[i] == piece and types[i] == gguf.TokenType.USER_DEFINED == 4
    assert sum(t == gguf.TokenType.USER_DEFINED for t in types) == 3


@needs_llama_cpp
def test_llama_cpp_tokenizes_boundary_tokens_as_one_token_each(exported, tokenizer):
    from services.exporter import gguf_export

    result, _ = exported
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    f32 = result.parity["gguf"]["f32"]
    assert f32["tokenizer_identical"] is True  # parity compares the boundary tokens and a RAG text too
    texts = [*RAG_BOUNDARY_TOKENS, RAG_TEXT]
    _, tokens, _ = gguf_export.llama_cpp_logits(result.path / "gguf" / "model-f32.gguf", [[4, 5]], texts)
    assert tokens[:3] == [[sp.piece_to_id(p)] for p in RAG_BOUNDARY_TOKENS]
    assert tokens[3] == sp.encode(RAG_TEXT)


def test_a_template_whose_markers_are_not_user_defined_pieces_is_refused(exported, tmp_path):
    from services.data_prep.tokenizer import train_tokenizer
    from shared.data.config import TokenizerConfig
    from tests.exporter.conftest import texts

    _, checkpoint = exported
    plain = tmp_path / "plain.model"
    plain.write_bytes(train_tokenizer(texts()[:80], TokenizerConfig(vocab_size=600)))
    template = {"chunk_open": "<ctx>", "chunk_close": "</ctx>", "doc_marker": "<doc>", "k": 2, "context_budget": 0.4}
    with pytest.raises(ExportError, match="not user-defined pieces"):
        export_checkpoint(checkpoint, plain, ["native"], tmp_path / "out", run_id="r", dataset_version="d",
                          config_hash=None, signing_key=KEY, rag_template=template)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*/rag_template.json"))


def test_a_plain_dataset_has_no_template(tmp_path):
    from tests.data_prep.conftest import make_config

    write_corpus(tmp_path, n_prose=20, n_code=10)
    assert rag_template_of(prepare(tmp_path, make_config()).manifest_path) is None
