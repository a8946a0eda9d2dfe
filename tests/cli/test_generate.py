"""`helox generate`: streams, refuses a tampered export, one text per seed in every format."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from helox import sample as sample_mod
from helox.cli import main
from helox.sample import SampleError, max_ngram_repeats, open_export, stream_text
from services.data_prep.tokenizer import train_tokenizer
from services.exporter.config import ExportConfig
from services.exporter.export import export_checkpoint
from shared.checkpoint import save_checkpoint
from shared.data.config import TokenizerConfig
from shared.model import Llama, model_preset
from tests.exporter.conftest import texts, train_steps

KEY = "test-generate-key"
PROMPT = "def "


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """A tiny model trained briefly on prose and code: its checkpoint, tokenizer and export
    (native, onnx with the KV graph, gguf f32)."""
    import sentencepiece as spm

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gen")
    tok = root / "tokenizer.model"
    tok.write_bytes(train_tokenizer(texts(), TokenizerConfig(vocab_size=1024)))
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    ids = np.concatenate([np.array(sp.encode(t) + [sp.eos_id()], dtype=np.int64) for t in texts()])
    config = model_preset("tiny")
    torch.manual_seed(0)
    model = Llama(config)
    train_steps(model, ids, 80, lr=3e-3, seed=0)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    info = save_checkpoint(root / "ckpt", 80, state, {"step": 80, "model_config": config.model_dump(mode="json"),
                                                      "dataset_version": "ds-gen"},
                           meta={"reason": "final", "dataset_version": "ds-gen", "run_id": "run-gen"})
    formats = ["native", "onnx"] + (["gguf"] if importlib.util.find_spec("llama_cpp") else [])
    res = export_checkpoint(info.path, tok, formats, root / "exports", run_id="run-gen", dataset_version="ds-gen",
                            config_hash="c" * 64, signing_key=KEY,
                            config=ExportConfig(formats=formats, gguf_types=["f32"]))
    return {"export": res.path, "checkpoint": info.path, "tokenizer": tok}


def _generate(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    monkeypatch.setenv("HELOX_SIGNING_KEY", KEY)
    try:
        main(["generate", *args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_writes_each_piece_as_its_token_comes(exported, capsys, monkeypatch):
    # Every write is flushed, and the pieces are written between decoder steps, not after the last.
    steps: list[int] = []
    real_step = sample_mod.NativeDecoder.step

    def counted(self, token):
        steps.append(token)
        return real_step(self, token)

    monkeypatch.setattr(sample_mod.NativeDecoder, "step", counted)
    writes: list[tuple[int, str]] = []
    flushes: list[int] = []

    class Out:
        def write(self, s):
            writes.append((len(steps), s))

        def flush(self):
            flushes.append(len(writes))

    monkeypatch.setattr("sys.stdout", Out())
    code, _, err = _generate(capsys, monkeypatch, str(exported["export"]), "--prompt", PROMPT, "--max-tokens", "24",
                             "--seed", "1")
    assert code == 0, err
    assert writes[0] == (0, PROMPT)
    pieces = [(n, s) for n, s in writes[1:] if s != "\n"]
    assert len(pieces) >= 3 and pieces[0][0] <= 1 < pieces[-1][0]  # the first piece before most steps ran
    assert len(flushes) == len(writes)


def test_stream_text_yields_before_decoding_ends(exported):
    opened = open_export(exported["export"], KEY, "native")
    calls = []
    real = opened.decoder.step
    opened.decoder.step = lambda tok: (calls.append(tok), real(tok))[1]
    it = stream_text(opened, PROMPT, max_new_tokens=30, temperature=0.8, seed=0)
    next(it)
    assert len(calls) <= 1  # one token decoded, 29 to go
    rest = list(it)
    assert len(calls) > 5 and rest


def test_a_tampered_export_is_refused_with_one_line_naming_the_check(exported, capsys, monkeypatch, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(exported["export"], bad)
    weights = bad / "native" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    code, out, err = _generate(capsys, monkeypatch, str(bad), "--prompt", PROMPT)
    assert code == 1 and out == ""
    assert "digests" in err and "failed verification" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("HELOX_SIGNING_KEY", "another-key")
    with pytest.raises(SampleError, match="signature"):
        open_export(exported["export"], "another-key", "native")


@pytest.mark.parametrize("fmt", ["onnx", "gguf"])
def test_greedy_text_is_identical_across_native_and_other_formats(exported, fmt):
    if fmt == "gguf" and importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    texts_by_format = {}
    for f in ("native", fmt):
        ids: list[int] = []
        text = "".join(stream_text(open_export(exported["export"], KEY, f), PROMPT, max_new_tokens=32,
                                   temperature=0.0, token_ids=ids))
        texts_by_format[f] = (text, ids)
    assert texts_by_format["native"] == texts_by_format[fmt]
    assert len(texts_by_format["native"][1]) > 0


def test_sampling_is_seeded_and_the_kv_cache_matches_the_full_sequence(exported):
    onnx = open_export(exported["export"], KEY, "onnx")
    native = open_export(exported["export"], KEY, "native")
    a = "".join(stream_text(native, PROMPT, max_new_tokens=24, temperature=1.0, top_k=20, seed=7))
    b = "".join(stream_text(native, PROMPT, max_new_tokens=24, temperature=1.0, top_k=20, seed=7))
    c = "".join(stream_text(native, PROMPT, max_new_tokens=24, temperature=1.0, top_k=20, seed=8))
    assert a == b and a != c
    assert onnx.decoder.past_names  # the KV graph, fed by session input names
    ids = onnx.tokenizer.encode(PROMPT + "return x")
    logits = onnx.decoder.prefill(ids[:2])
    for tok in ids[2:]:
        logits = onnx.decoder.step(tok)
    full = native.decoder.prefill(ids)
    np.testing.assert_allclose(logits, full, atol=1e-4)


def test_generate_from_a_checkpoint_with_its_tokenizer(exported, capsys, monkeypatch):
    code, out, err = _generate(capsys, monkeypatch, str(exported["checkpoint"]), "--prompt", PROMPT,
                               "--tokenizer", str(exported["tokenizer"]), "--temperature", "0", "--max-tokens", "16")
    assert code == 0, err
    native = open_export(exported["export"], KEY, "native")
    greedy = "".join(stream_text(native, PROMPT, max_new_tokens=16, temperature=0.0, repetition_penalty=1.3))
    assert out == PROMPT + greedy + "\n"  # the CLI's default penalty applies to greedy decoding too
    code, out, err = _generate(capsys, monkeypatch, str(exported["checkpoint"]), "--prompt", PROMPT,
                               "--tokenizer", str(exported["tokenizer"]), "--temperature", "0", "--max-tokens", "16",
                               "--repetition-penalty", "1")
    assert code == 0, err
    assert out == PROMPT + "".join(stream_text(native, PROMPT, max_new_tokens=16, temperature=0.0)) + "\n"
    code, _, err = _generate(capsys, monkeypatch, str(exported["checkpoint"]), "--prompt", PROMPT,
                             "--format", "onnx")
    assert code == 1 and "only --format native" in err


def test_max_ngram_repeats_counts_the_most_repeated_4gram():
    assert max_ngram_repeats([1, 2, 3]) == 0
    assert max_ngram_repeats([1, 2, 3, 4, 5, 6]) == 1
    assert max_ngram_repeats([1, 2, 3, 4] * 3) == 3  # 1234 at 0, 4, 8


def test_the_run_prints_val_bpb_next_to_a_seeded_sample_and_its_repeat_count(exported, capsys, monkeypatch):
    from types import SimpleNamespace

    from helox import common
    from helox.commands.run import SAMPLE_PROMPT, _show_model
    from helox.sample import sample_from_export

    monkeypatch.setenv("HELOX_SIGNING_KEY", KEY)
    ready = SimpleNamespace(model_id="m1", manifest=SimpleNamespace(uri=f"file://{exported['export']}/manifest.json"),
                            formats={}, metrics={"bits_per_byte": 1.734})
    _show_model(ready, common.settings())
    out = capsys.readouterr().out
    s = sample_from_export(exported["export"], KEY, SAMPLE_PROMPT, max_new_tokens=64)
    assert s == sample_from_export(exported["export"], KEY, SAMPLE_PROMPT, max_new_tokens=64)  # seeded
    assert "val bits/byte 1.734" in out
    assert f"most repeated 4-gram: {max_ngram_repeats(s.token_ids)}x" in out and "temperature 0.8" in out
    assert (SAMPLE_PROMPT + s.text).strip()[:20] in out


def test_rag_prompt_is_laid_out_as_training_packed_it(tmp_path):
    import sentencepiece as spm

    from helox.sample import rag_prompt_ids
    from shared.data.config import RAG_BOUNDARY_TOKENS
    from shared.retrieval import LocalIndex

    tok = tmp_path / "tok.model"
    tok.write_bytes(train_tokenizer(texts(), TokenizerConfig(vocab_size=1024), user_defined_symbols=RAG_BOUNDARY_TOKENS))
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    docs = [("a", "the kingdom of heaven is like a mustard seed"), ("b", "def parse(x):\n    return int(x)"),
            ("c", "sorting lists with sorted and key functions")]
    LocalIndex.build(docs, chunk_tokens=32).save(tmp_path / "index")
    template = {"chunk_open": "<ctx>", "chunk_close": "</ctx>", "doc_marker": "<doc>", "k": 1,
                "context_budget": 0.5, "seq_len": 64}
    prompt = "def parse"
    ids, used = rag_prompt_ids(sp, template, tmp_path / "index", prompt, 512)
    ctx_open, ctx_close, doc = (sp.piece_to_id(m) for m in RAG_BOUNDARY_TOKENS)
    base = sp.encode(prompt)
    assert used == 1 and ids[0] == ctx_open and ids[-len(base) - 1] == doc and ids[-len(base):] == base
    assert sp.decode(ids[1:ids.index(ctx_close)]) == docs[1][1]  # the chunk the prompt retrieves


def test_rag_needs_an_export_with_a_rag_template(exported, capsys, monkeypatch, tmp_path):
    code, out, err = _generate(capsys, monkeypatch, str(exported["export"]), "--prompt", PROMPT, "--rag",
                               "--index", str(tmp_path))
    assert code == 1 and "rag_template.json" in err and out == ""
