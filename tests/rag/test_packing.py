"""RAG packing with the local index: boundary tokens, the loss mask, leakage control, crops, resume,
versions and verification (no bus needed: rag.retriever = local)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from services.data_prep.pipeline import plan_version
from services.data_prep.retrieval import duplicate_clusters
from services.data_prep.tokenizer import TokenizerError, load_tokenizer
from shared.artifacts import ArtifactStore
from shared.data.config import RAG_BOUNDARY_TOKENS, TokenizerConfig
from shared.data.dataset import BatchLoader, TokenDataset, crop_window, validation_batches
from shared.data.manifest import MASK_BASE, MASK_CONTEXT, MASK_PAD, verify_dataset
from shared.retrieval import LocalIndex, index_digest
from tests.data_prep.conftest import make_config

from .conftest import prepare, rag_config, report


def records(result, split: str = "train"):
    root = result.manifest_path.parent
    W = result.manifest.rag.record_tokens
    for s in result.manifest.shards_for(split):
        tok = np.fromfile(root / s.path, dtype=s.dtype).astype(np.int64).reshape(-1, W)
        kind = np.fromfile(root / s.mask.path, dtype=np.uint8).reshape(-1, W)
        yield from zip(tok, kind, strict=True)


def test_boundary_tokens_are_real_pieces_that_round_trip(corpus_root: Path) -> None:
    result = prepare(corpus_root, rag_config())
    sp = load_tokenizer(result.manifest_path.parent / result.manifest.tokenizer.path)
    ids = result.manifest.rag.boundary_ids
    assert set(ids) == set(RAG_BOUNDARY_TOKENS) and len(set(ids.values())) == 3
    for piece, i in ids.items():
        assert sp.id_to_piece(i) == piece and sp.encode(piece) == [i]
    text = "<ctx>def f(x):\n    return x</ctx><ctx>Second, citizen</ctx><doc>First Citizen:\nBefore we proceed"
    enc = sp.encode(text)
    assert [t for t in enc if t in ids.values()] == [ids["<ctx>"], ids["</ctx>"], ids["<ctx>"], ids["</ctx>"],
                                                      ids["<doc>"]]
    assert sp.decode(enc) == text
    # In the shards: every record has exactly one <doc>, right before its base text.
    for tok, kind in records(result):
        base = np.flatnonzero(kind == MASK_BASE)
        assert tok[base[0] - 1] == ids["<doc>"] and (tok == ids["<doc>"]).sum() >= 1
        assert (tok[kind == MASK_CONTEXT] == ids["<ctx>"]).sum() == (tok[kind == MASK_CONTEXT] == ids["</ctx>"]).sum()


def test_a_reused_tokenizer_without_the_boundary_tokens_is_refused(corpus_root: Path) -> None:
    plain = prepare(corpus_root, make_config())
    cfg = rag_config()
    cfg = cfg.model_copy(update={"tokenizer": TokenizerConfig(vocab_size=400, from_dataset=plain.manifest.version)})
    with pytest.raises(TokenizerError, match=r"data\.rag"):
        prepare(corpus_root, cfg)


def test_no_window_retrieves_its_own_document_its_duplicates_or_validation_text(corpus_root: Path) -> None:
    result = prepare(corpus_root, rag_config())
    m = result.manifest
    removed = [json.loads(x) for x in (result.manifest_path.parent / m.dedup_report.path).read_text().splitlines()]
    assert {r["removed"].split(":")[1] for r in removed} >= {"z_exact_copy.txt", "z_near_copy.txt"}
    clusters = duplicate_clusters(removed)
    lines = report(result)
    val_sources = {s for line in lines if line["window"].startswith("val/") for s in line["sources"]}
    train_sources = {s for line in lines if line["window"].startswith("train/") for s in line["sources"]}
    assert val_sources and not val_sources & train_sources
    packed = 0
    for line in lines:
        own = set(line["sources"]) | {o for s in line["sources"] for o in clusters.get(s, ())}
        for c in line["chunks"]:
            packed += 1
            assert c["source_id"] not in own, line["window"]
            assert c["source_id"] in train_sources, line["window"]  # validation text is never retrieved
    assert packed >= len(lines)  # the rule held over real retrievals, not an empty report
    assert m.rag.windows == {"train": sum(1 for x in lines if x["window"].startswith("train/")),
                             "val": len(lines) - m.rag.windows["train"]}
    assert m.rag.queries_by_retriever == {"local-bm25": len(lines)}
    assert m.rag.chunks_by_retriever == {"local-bm25": packed}


def test_records_are_pad_context_marker_base_and_the_mask_weighs_them(corpus_root: Path) -> None:
    result = prepare(corpus_root, rag_config(context_loss_weight=0.25))
    rag = result.manifest.rag
    budget = int(rag.context_budget * rag.record_tokens)
    for _tok, kind in records(result):
        runs = [int(k) for i, k in enumerate(kind) if i == 0 or kind[i - 1] != k]
        assert runs in ([MASK_PAD, MASK_CONTEXT, MASK_BASE], [MASK_CONTEXT, MASK_BASE])
        assert (kind == MASK_CONTEXT).sum() <= budget + 1  # the chunks' budget, plus the <doc> marker
    ds = TokenDataset(result.manifest_path, "train", batch_size=8, seq_len=rag.seq_len)
    b = ds.batch_at()
    weights = torch.tensor([0.0, 0.25, 1.0])[b["token_kind"].long()]
    assert torch.equal(b["loss_mask"], weights)
    assert set(b["loss_mask"].unique().tolist()) == {0.25, 1.0} | ({0.0} if (b["token_kind"] == 0).any() else set())
    assert rag.tokens["context"] > 0.2 * rag.tokens["base"]


def test_shorter_windows_cut_the_retrieved_part_first() -> None:
    kinds = np.array([0, 0, 1, 1, 1, 1, 2, 2, 2, 2], dtype=np.uint8)
    tokens = np.arange(10)
    t, k = crop_window(tokens, kinds, 7)  # marker + base fit: context goes first
    assert t.tolist() == [3, 4, 5, 6, 7, 8, 9] and k.tolist() == [1, 1, 1, 2, 2, 2, 2]
    t, k = crop_window(tokens, kinds, 5)
    assert t.tolist() == [5, 6, 7, 8, 9] and k.tolist() == [1, 2, 2, 2, 2]
    t, k = crop_window(tokens, kinds, 3)  # base longer than the window: the marker, then base from its start
    assert t.tolist() == [5, 6, 7] and k.tolist() == [1, 2, 2]


def test_curriculum_windows_keep_the_base_targets(corpus_root: Path) -> None:
    result = prepare(corpus_root, rag_config())
    rag = result.manifest.rag
    base_len = rag.record_tokens - 1 - int(rag.context_budget * rag.record_tokens)
    full = TokenDataset(result.manifest_path, "train", batch_size=16, seq_len=rag.seq_len)
    short = TokenDataset(result.manifest_path, "train", batch_size=16, seq_len=base_len)  # marker + base only
    a, b = full.batch_at(), short.batch_at()
    assert torch.equal((a["token_kind"] == MASK_BASE).sum(1), (b["token_kind"] == MASK_BASE).sum(1))
    assert not (b["token_kind"] == MASK_CONTEXT).any()
    with pytest.raises(ValueError, match=r"rag\.seq_len"):
        TokenDataset(result.manifest_path, "train", batch_size=2, seq_len=rag.seq_len + 1)


def test_exact_resume_on_a_packed_dataset(corpus_root: Path) -> None:
    result = prepare(corpus_root, rag_config())
    seq = result.manifest.rag.seq_len

    def loader() -> BatchLoader:
        return BatchLoader(TokenDataset(result.manifest_path, "train", batch_size=4, seq_len=seq, seed=3))

    first = loader()
    for _ in range(7):
        first.next_batch()
    first.set_seq_len(seq // 2)  # a curriculum change mid-run is part of the state
    first.next_batch()
    state = first.state_dict()
    expected = [first.next_batch() for _ in range(6)]
    again = loader()
    again.load_state_dict(state)
    for want in expected:
        got = again.next_batch()
        assert got.cursor == want.cursor
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.labels, want.labels)
        assert torch.equal(got.loss_mask, want.loss_mask) and torch.equal(got.token_kind, want.token_kind)


def test_validation_batches_count_every_base_token_once(corpus_root: Path) -> None:
    result = prepare(corpus_root, rag_config(context_loss_weight=0.5))
    m = result.manifest
    counted = sum(float(b.loss_mask.sum()) for _, b in validation_batches(result.manifest_path, 4, m.rag.seq_len))
    base_val = sum(int((kind == MASK_BASE).sum()) for _, kind in records(result, "val"))
    assert counted == base_val > 0  # base labels only, whatever context_loss_weight


def test_the_version_follows_the_rag_settings_and_the_index_is_verified(corpus_root: Path) -> None:
    store = ArtifactStore(corpus_root / "store")
    base = plan_version(rag_config(), store, corpus_root)
    assert plan_version(rag_config(k=2), store, corpus_root) != base
    assert plan_version(rag_config(context_loss_weight=0.5), store, corpus_root) != base
    assert plan_version(rag_config(chunk_tokens=32), store, corpus_root) != base
    assert plan_version(rag_config(request_timeout_s=9.0, batch_queries=5), store, corpus_root) == base
    assert plan_version(make_config(), store, corpus_root) != base

    result = prepare(corpus_root, rag_config())
    assert result.manifest.version == base
    directory = result.manifest_path.parent
    index = result.manifest.rag.index
    assert index_digest(directory / index.path)[0] == index.sha256 == result.manifest.rag.retriever_index_digest
    loaded = LocalIndex.load(directory / index.path, index.sha256)
    assert len(loaded.chunks) == index.chunks and loaded.documents == index.documents
    assert verify_dataset(result.manifest_path).ok

    victim = directory / index.path / "chunks.jsonl"
    victim.write_bytes(victim.read_bytes().replace(b"a", b"b", 1))
    problems = verify_dataset(result.manifest_path).problems
    assert any("chunks.jsonl" in p for p in problems)
    again = prepare(corpus_root, rag_config())
    assert again.status.startswith("rebuilt") and "chunks.jsonl" in again.status
    assert verify_dataset(again.manifest_path).ok


def test_parity_samples_of_a_packed_dataset_are_windows_without_padding(corpus_root: Path) -> None:
    """Retrieved context weighs 0 in the loss but is real text: the evaluator's parity checks take
    packed windows that hold no padding (they used to demand every label's weight be 1, which no
    window with retrieved context meets, and failed every RAG run whose windows all had chunks)."""
    from services.evaluator.heldout import sample_sequences

    result = prepare(corpus_root, rag_config())
    seq_len = result.manifest.rag.seq_len
    rows = sample_sequences(result.manifest_path, 4, seq_len)
    assert rows.shape[0] >= 2 and rows.shape[1] == seq_len
    windows = {tuple(tok[:seq_len].tolist()): kind[1:seq_len + 1] for tok, kind in records(result, "val")}
    with_context = 0
    for row in rows.tolist():
        kind = windows[tuple(row)]
        assert (kind != MASK_PAD).all()
        with_context += bool((kind == MASK_CONTEXT).any())
    assert with_context > 0, "no sampled window held retrieved context: the test would not see the bug"
