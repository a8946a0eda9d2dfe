"""prepare_dataset end to end on tiny corpora: shards, manifest, reuse, verification, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import services.data_prep.pipeline as pipeline
import services.data_prep.sharding as sharding
import services.data_prep.tokenizer as tokenizer_module
from services.data_prep.ingest import EmptyCorpusError, PathOutsideRootsError
from services.data_prep.pipeline import ParentDatasetError, prepare_dataset
from services.data_prep.tokenizer import EOS_ID, load_tokenizer
from shared.artifacts import ArtifactStore
from shared.data.config import CorpusConfig, CorpusSource, FilterConfig, SemanticConfig, TokenizerConfig
from shared.data.manifest import (
    ShardCorruptError,
    format_summary,
    inspect_dataset,
    load_histograms,
    load_manifest,
    verify_dataset,
)

from .conftest import code_doc, make_config


@pytest.fixture
def prepared(corpus_dir: Path, store: ArtifactStore) -> pipeline.PrepareResult:
    return prepare_dataset(make_config(), store, base_dir=corpus_dir)


def read_shard(dataset_dir: Path, rel: str, dtype: str) -> np.ndarray:
    return np.memmap(dataset_dir / rel, dtype=dtype, mode="r")


def test_dataset_layout_and_manifest(prepared: pipeline.PrepareResult, store: ArtifactStore) -> None:
    m = prepared.manifest
    root = prepared.manifest_path.parent
    assert not prepared.reused
    assert root == store.path("datasets", m.version)
    assert m.pipeline_version == pipeline.PIPELINE_VERSION and m.parent_version is None
    assert m.dtype == "uint16" and m.tokenizer.vocab_size == 400
    assert (m.tokenizer.pad_id, m.tokenizer.unk_id, m.tokenizer.bos_id, m.tokenizer.eos_id) == (0, 1, 2, 3)
    assert set(m.domains) == {"prose", "code"}
    assert len(m.shards_for("train", "prose")) > 1  # shard_tokens is small: several shards
    assert m.tokens("val") > 0
    for shard in m.shards:
        assert shard.path.startswith(f"{shard.split}/{shard.domain}/shard_")
        tokens = read_shard(root, shard.path, shard.dtype)
        assert tokens.size == shard.tokens and tokens[-1] == EOS_ID
        assert int((tokens == EOS_ID).sum()) == shard.documents
    for name, d in m.domains.items():
        assert d.train_tokens == sum(s.tokens for s in m.shards_for("train", name))
        assert d.val_tokens == sum(s.tokens for s in m.shards_for("val", name))
        assert d.documents == d.train_documents + d.val_documents
    assert [r.stage for r in prepared.reports] == [
        "ingest", "filter", "exact_dedup", "near_dedup", "tokenizer", "tokenize"
    ]
    assert json.loads(prepared.manifest_path.read_text())["version"] == m.version
    assert not [p for p in store.path("datasets").iterdir() if p.name.startswith(".tmp-")]


def test_shards_decode_back_to_the_documents(prepared: pipeline.PrepareResult, corpus_dir: Path) -> None:
    root = prepared.manifest_path.parent
    sp = load_tokenizer(root / prepared.manifest.tokenizer.path)
    decoded = set()
    for shard in prepared.manifest.shards_for("train", "code") + prepared.manifest.shards_for("val", "code"):
        tokens = np.asarray(read_shard(root, shard.path, shard.dtype)).tolist()
        doc: list[int] = []
        for t in tokens:
            if t == EOS_ID:
                decoded.add(sp.decode(doc))
                doc = []
            else:
                doc.append(t)
    originals = {p.read_text() for p in (corpus_dir / "corpus" / "code").iterdir()}
    assert decoded == {t.strip("\n") for t in originals}


def test_histograms_count_every_token(prepared: pipeline.PrepareResult) -> None:
    hist = load_histograms(prepared.manifest_path)
    m = prepared.manifest
    assert set(hist) == {f"{s}/{d}" for s in ("train", "val") for d in m.domains if m.shards_for(s, d)}
    for key, counts in hist.items():
        split, domain = key.split("/")
        assert counts.shape == (m.tokenizer.vocab_size,)
        assert int(counts.sum()) == sum(s.tokens for s in m.shards_for(split, domain))  # type: ignore[arg-type]


def test_same_config_reuses_the_dataset_without_recomputing(
    prepared: pipeline.PrepareResult, corpus_dir: Path, store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the pipeline ran again")

    monkeypatch.setattr(pipeline, "_build", boom)
    again = prepare_dataset(make_config(), store, base_dir=corpus_dir)
    assert again.reused and again.manifest.version == prepared.manifest.version
    assert again.manifest_path == prepared.manifest_path


def test_incomplete_dataset_directory_is_rebuilt(
    prepared: pipeline.PrepareResult, corpus_dir: Path, store: ArtifactStore
) -> None:
    shard = prepared.manifest_path.parent / prepared.manifest.shards[0].path
    shard.write_bytes(shard.read_bytes()[:-2])
    again = prepare_dataset(make_config(), store, base_dir=corpus_dir)
    assert not again.reused
    assert verify_dataset(again.manifest_path).ok


def test_verify_catches_a_flipped_byte(prepared: pipeline.PrepareResult) -> None:
    assert verify_dataset(prepared.manifest_path, full=True).ok
    shard = prepared.manifest.shards[1]
    path = prepared.manifest_path.parent / shard.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert verify_dataset(prepared.manifest_path, full=False).ok  # same size: only the hash sees it
    report = verify_dataset(prepared.manifest_path, full=True)
    assert not report.ok and shard.path in report.problems[0]
    with pytest.raises(ShardCorruptError, match=shard.path):
        report.raise_for_problems()


def test_workers_do_not_change_the_bytes(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "_MIN_PARALLEL_BYTES", 0)
    one = prepare_dataset(make_config(), ArtifactStore(tmp_path / "s1"), base_dir=corpus_dir)
    cfg = make_config()
    cfg.sharding.workers = 2
    two = prepare_dataset(cfg, ArtifactStore(tmp_path / "s2"), base_dir=corpus_dir)
    assert two.reports[-1].details["workers"] == 2
    assert one.manifest.version == two.manifest.version
    assert [s.sha256 for s in one.manifest.shards] == [s.sha256 for s in two.manifest.shards]
    assert one.manifest.tokenizer.sha256 == two.manifest.tokenizer.sha256


def test_line_by_line_encoding_does_not_change_the_bytes(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sharding, "_ENCODERS", {})  # workers=1: encoders live in this process
    fast = prepare_dataset(make_config(), ArtifactStore(tmp_path / "s1"), base_dir=corpus_dir)
    assert [e.by_line for e in sharding._ENCODERS.values()] == [True]
    monkeypatch.setattr(sharding, "_ENCODERS", {})
    monkeypatch.setattr(tokenizer_module, "newline_ids", lambda sp: None)  # whole documents through sp.encode
    whole = prepare_dataset(make_config(), ArtifactStore(tmp_path / "s2"), base_dir=corpus_dir)
    assert [e.by_line for e in sharding._ENCODERS.values()] == [False]
    assert [s.sha256 for s in fast.manifest.shards] == [s.sha256 for s in whole.manifest.shards]


def test_progress_reports_each_stage(corpus_dir: Path, store: ArtifactStore) -> None:
    calls: list[tuple[str, float]] = []
    prepare_dataset(make_config(), store, lambda stage, f: calls.append((stage, f)), base_dir=corpus_dir)
    stages = list(dict.fromkeys(s for s, _ in calls))
    assert stages == ["ingest", "filter", "exact_dedup", "near_dedup", "tokenizer", "tokenize", "manifest"]
    assert all(0.0 <= f <= 1.0 for _, f in calls)
    assert calls[-1] == ("manifest", 1.0)


def test_duplicates_are_removed_and_counted(corpus_dir: Path, store: ArtifactStore) -> None:
    code = corpus_dir / "corpus" / "code"
    (code / "copy.py").write_text((code / "m0001.py").read_text())  # exact copy
    near = code_doc(2).replace("import math", "import math  # edited")
    (code / "near.py").write_text(near)  # near copy of m0002.py
    result = prepare_dataset(make_config(), store, base_dir=corpus_dir)
    reports = {r.stage: r for r in result.reports}
    assert reports["exact_dedup"].removed == 1
    assert reports["near_dedup"].removed == 1 and reports["near_dedup"].details["verified_pairs"] >= 1


def test_ingest_report_counts_non_utf8_and_binary(corpus_dir: Path, store: ArtifactStore) -> None:
    prose = corpus_dir / "corpus" / "prose"
    (prose / "latin1.txt").write_bytes(("caf\u00e9 " * 40).encode("latin-1"))
    (prose / "blob.txt").write_bytes(b"\x00\x01" * 100)
    result = prepare_dataset(make_config(), store, base_dir=corpus_dir)
    details = result.reports[0].details
    assert details["non_utf8_files"] == 1 and details["replaced_chars"] == 40
    assert details["binary_skipped"] == 1 and details["binary_files"] == ["0:blob.txt"]


def test_ingest_report_counts_files_and_documents_separately(tmp_path: Path, store: ArtifactStore) -> None:
    (tmp_path / "corpus").mkdir()
    lines = [json.dumps({"text": f"Record {i}: " + code_doc(i)}) for i in range(69)]
    (tmp_path / "corpus" / "records.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "corpus" / "blob.txt").write_bytes(b"\x00" * 10)
    cfg = make_config(corpus=CorpusConfig(sources=[CorpusSource(path="corpus", domain="d")], roots=["corpus"]))
    result = prepare_dataset(cfg, store, base_dir=tmp_path)
    ingest = result.reports[0]
    assert ingest.stage == "ingest"
    assert (ingest.files_in, ingest.files_skipped) == (2, 1)  # one JSONL file read, one binary file skipped
    assert (ingest.docs_in, ingest.docs_out, ingest.removed) == (69, 69, 0)
    assert result.reports[1].docs_in == 69
    assert "files 2 (1 skipped)" in format_summary(inspect_dataset(result.manifest_path))


def test_empty_corpus_fails_clearly(tmp_path: Path, store: ArtifactStore) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "blob.txt").write_bytes(b"\x00" * 10)
    cfg = make_config(corpus=CorpusConfig(sources=[CorpusSource(path="corpus", domain="d")], roots=["corpus"]))
    with pytest.raises(EmptyCorpusError, match="no document"):
        prepare_dataset(cfg, store, base_dir=tmp_path)


def test_all_filtered_corpus_fails_naming_the_stage(corpus_dir: Path, store: ArtifactStore) -> None:
    cfg = make_config(filters=FilterConfig(min_doc_chars=10**6, max_doc_chars=10**7))
    with pytest.raises(EmptyCorpusError, match=r"filter.*too_short"):
        prepare_dataset(cfg, store, base_dir=corpus_dir)
    assert not [p for p in store.path("datasets").iterdir() if p.name.startswith(".tmp-")]


def test_path_outside_roots_is_rejected(corpus_dir: Path, store: ArtifactStore) -> None:
    cfg = make_config(corpus=CorpusConfig(sources=[CorpusSource(path="corpus", domain="d")], roots=["elsewhere"]))
    with pytest.raises(PathOutsideRootsError, match="corpus"):
        prepare_dataset(cfg, store, base_dir=corpus_dir)


def test_tokenizer_reused_from_a_parent_dataset_records_lineage(
    prepared: pipeline.PrepareResult, corpus_dir: Path, store: ArtifactStore
) -> None:
    parent = prepared.manifest
    (corpus_dir / "corpus" / "prose" / "extra.txt").write_text("A new scene, with new words in it. " * 5)
    cfg = make_config(tokenizer=TokenizerConfig(vocab_size=400, from_dataset=parent.version))
    child = prepare_dataset(cfg, store, base_dir=corpus_dir)
    assert child.manifest.parent_version == parent.version
    assert child.manifest.version != parent.version
    assert child.manifest.tokenizer.sha256 == parent.tokenizer.sha256
    assert not child.manifest.tokenizer.trained and child.manifest.tokenizer.source == f"dataset:{parent.version}"
    missing = make_config(tokenizer=TokenizerConfig(vocab_size=400, from_dataset="ds-missing"))
    with pytest.raises(ParentDatasetError, match="ds-missing"):
        prepare_dataset(missing, store, base_dir=corpus_dir)


def test_tokenizer_reused_from_a_file(prepared: pipeline.PrepareResult, corpus_dir: Path, store: ArtifactStore) -> None:
    src = prepared.manifest_path.parent / prepared.manifest.tokenizer.path
    (corpus_dir / "corpus" / "tok.model").write_bytes(src.read_bytes())
    cfg = make_config(tokenizer=TokenizerConfig(model_path="corpus/tok.model"))
    result = prepare_dataset(cfg, store, base_dir=corpus_dir)
    assert result.manifest.tokenizer.sha256 == prepared.manifest.tokenizer.sha256
    assert result.manifest.tokenizer.source == str((corpus_dir / "corpus" / "tok.model").resolve())


def test_semantic_stage_runs_with_the_real_model(corpus_dir: Path, store: ArtifactStore) -> None:
    prose = corpus_dir / "corpus" / "prose"
    original = (prose / "p0003.txt").read_text()
    (prose / "para.txt").write_text(original.replace("\n", " \n").replace(",", ";") + "\nIndeed.")
    cfg = make_config(semantic=SemanticConfig(enabled=True, threshold=0.97, n_clusters=4))
    result = prepare_dataset(cfg, store, base_dir=corpus_dir)
    sem = {r.stage: r for r in result.reports}["semantic_dedup"]
    assert sem.removed >= 1 and sem.details["pairs"] == sem.removed
    root = result.manifest_path.parent
    records = [json.loads(line) for line in (root / result.manifest.dedup_report.path).read_text().splitlines()]
    semantic = [r for r in records if r["stage"] == "semantic_dedup"]
    assert len(semantic) == sem.removed and all(r["measure"] == "cosine" for r in semantic)
    pair = [r for r in semantic if {r["removed"], r["duplicate_of"]} == {"0:p0003.txt", "0:para.txt"}]
    assert len(pair) == 1 and 0.97 < pair[0]["similarity"] <= 1.0 + 1e-6


def test_inspect_summary(prepared: pipeline.PrepareResult) -> None:
    summary = inspect_dataset(prepared.manifest_path)
    assert summary["version"] == prepared.manifest.version
    assert summary["tokens"]["train"] == prepared.manifest.tokens("train")
    assert summary["tokenizer"]["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    text = format_summary(summary)
    assert prepared.manifest.version in text and "prose" in text and "near_dedup" in text
    assert load_manifest(prepared.manifest_path.parent) == prepared.manifest
    assert os.path.basename(prepared.manifest_path) == "manifest.json"
