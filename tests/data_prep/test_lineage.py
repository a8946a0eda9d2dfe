"""What went into a dataset and what was taken out: per-file input digests, the dedup report,
reuse that re-verifies digests, and splits checked at data prep."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from services.data_prep.ingest import CorpusError, normalize_text
from services.data_prep.pipeline import prepare_dataset
from services.data_prep.sharding import is_validation
from shared.artifacts import ArtifactStore
from shared.data.config import CorpusConfig, CorpusSource, ShardingConfig
from shared.data.manifest import load_manifest, verify_dataset

from .conftest import code_doc, make_config
from .planted import exact_jaccard


def _plant_duplicates(corpus_dir: Path) -> tuple[str, str]:
    """An exact copy of m0001.py and a near copy of m0002.py; returns the near copy's two texts."""
    code = corpus_dir / "corpus" / "code"
    (code / "copy.py").write_text((code / "m0001.py").read_text())
    near = code_doc(2).replace("import math", "import math  # edited")
    (code / "near.py").write_text(near)
    return code_doc(2), near


def _report(result) -> list[dict]:
    root = result.manifest_path.parent
    info = result.manifest.dedup_report
    data = (root / info.path).read_bytes()
    assert hashlib.sha256(data).hexdigest() == info.sha256 and len(data) == info.size_bytes
    return [json.loads(line) for line in data.decode().splitlines()]


def test_manifest_lists_the_digest_of_every_input_file(corpus_dir: Path, store: ArtifactStore) -> None:
    result = prepare_dataset(make_config(), store, base_dir=corpus_dir)
    inputs = result.manifest.inputs
    files = sorted((corpus_dir / "corpus").rglob("*.*"))
    assert inputs.files == len(inputs.per_file) == len(files) == 100
    for entry in inputs.per_file:
        base = corpus_dir / "corpus" / ("prose" if entry.source == 0 else "code")
        data = (base / entry.path).read_bytes()
        assert entry.sha256 == hashlib.sha256(data).hexdigest() and entry.bytes == len(data)
    # The combined digest (which the version is derived from) is computed from exactly this list.
    h = hashlib.sha256()
    for entry in inputs.per_file:
        h.update(f"{entry.source}\0{entry.path}\0{entry.sha256}\n".encode())
    assert inputs.digest == h.hexdigest()

    target = corpus_dir / "corpus" / "prose" / "p0007.txt"
    target.write_text(target.read_text() + "An added line.\n")
    changed = prepare_dataset(make_config(), store, base_dir=corpus_dir).manifest
    assert changed.version != result.manifest.version
    before = {(e.source, e.path): e.sha256 for e in inputs.per_file}
    after = {(e.source, e.path): e.sha256 for e in changed.inputs.per_file}
    assert [k for k in before if before[k] != after[k]] == [(0, "p0007.txt")]
    assert after[(0, "p0007.txt")] == hashlib.sha256(target.read_bytes()).hexdigest()


def test_dedup_report_names_each_removed_document_and_what_it_duplicates(
    corpus_dir: Path, store: ArtifactStore
) -> None:
    original, near = _plant_duplicates(corpus_dir)
    result = prepare_dataset(make_config(), store, base_dir=corpus_dir)
    records = _report(result)
    stages = {r.stage: r for r in result.reports}
    # Sorted paths: copy.py is read before m0001.py, so the copy is the first occurrence and kept.
    exact = [r for r in records if r["stage"] == "exact_dedup"]
    assert [(r["removed"], r["duplicate_of"]) for r in exact] == [("1:m0001.py", "1:copy.py")]
    assert exact[0]["similarity"] == 1.0
    assert exact[0]["removed_sha256"] == hashlib.sha256(normalize_text(code_doc(1)).encode()).hexdigest()
    near_records = [r for r in records if r["stage"] == "near_dedup"]
    assert [(r["removed"], r["duplicate_of"]) for r in near_records] == [("1:near.py", "1:m0002.py")]
    assert near_records[0]["similarity"] == pytest.approx(
        exact_jaccard(normalize_text(original), normalize_text(near)), abs=1e-12
    )
    assert near_records[0]["measure"] == "jaccard"
    assert len(exact) == stages["exact_dedup"].removed and len(near_records) == stages["near_dedup"].removed
    assert result.manifest.dedup_report.records == {"exact_dedup": 1, "near_dedup": 1}

    assert verify_dataset(result.manifest_path).ok
    path = result.manifest_path.parent / result.manifest.dedup_report.path
    data = bytearray(path.read_bytes())
    data[5] ^= 0x20
    path.write_bytes(bytes(data))
    report = verify_dataset(result.manifest_path)
    assert not report.ok and "dedup" in report.problems[0]


def test_an_identical_rerun_reuses_after_verifying_every_digest(corpus_dir: Path, store: ArtifactStore) -> None:
    first = prepare_dataset(make_config(), store, base_dir=corpus_dir)
    assert not first.reused and first.status == "built"
    again = prepare_dataset(make_config(), store, base_dir=corpus_dir)
    n = len(first.manifest.shards)
    assert again.reused and again.status == f"reused (verified {n} shards by SHA-256)"


def test_a_corrupt_shard_of_the_same_size_is_rebuilt_not_reused(corpus_dir: Path, store: ArtifactStore) -> None:
    first = prepare_dataset(make_config(), store, base_dir=corpus_dir)
    shard = first.manifest.shards[2]
    path = first.manifest_path.parent / shard.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    again = prepare_dataset(make_config(), store, base_dir=corpus_dir)
    assert not again.reused
    assert again.status == f"rebuilt: shard {shard.path} failed its digest"
    assert again.manifest.version == first.manifest.version
    assert verify_dataset(again.manifest_path, full=True).ok
    assert load_manifest(again.manifest_path).shards[2].sha256 == shard.sha256  # the same bytes again


def _small_corpus(tmp_path: Path, n: int) -> Path:
    (tmp_path / "corpus").mkdir()
    for i in range(n):
        (tmp_path / "corpus" / f"m{i}.py").write_text(code_doc(1000 + i))
    return tmp_path


def test_an_empty_validation_split_fails_at_data_prep_naming_the_setting(tmp_path: Path, store: ArtifactStore) -> None:
    base = _small_corpus(tmp_path, 6)
    digests = [hashlib.sha256(normalize_text(code_doc(1000 + i)).encode()).digest() for i in range(6)]
    assert not any(is_validation(d, 0, 0.01) for d in digests)  # none of the 6 hashes below 0.01
    cfg = make_config(
        corpus=CorpusConfig(sources=[CorpusSource(path="corpus", domain="code")], roots=["corpus"]),
        sharding=ShardingConfig(val_fraction=0.01, workers=1),
    )
    with pytest.raises(CorpusError, match=r"sharding\.val_fraction.*0\.01.*0 of 6 documents") as info:
        prepare_dataset(cfg, store, base_dir=base)
    # The message names the smallest fraction that would give a validation document.
    scores = [int.from_bytes(hashlib.sha256((0).to_bytes(8, "little") + d).digest()[:8], "little") / 2**64
              for d in digests]
    assert f"{math.ceil(min(scores) * 1e4) / 1e4:.4f}" in str(info.value)
    assert not list(store.path("datasets").glob(".tmp-*"))


def test_an_empty_training_split_fails_too(tmp_path: Path, store: ArtifactStore) -> None:
    base = _small_corpus(tmp_path, 2)
    cfg = make_config(
        corpus=CorpusConfig(sources=[CorpusSource(path="corpus", domain="code")], roots=["corpus"]),
        sharding=ShardingConfig(val_fraction=0.999, workers=1),
    )
    with pytest.raises(CorpusError, match=r"sharding\.val_fraction.*every one of the 2 documents"):
        prepare_dataset(cfg, store, base_dir=base)


def test_no_validation_split_is_fine_when_none_is_asked_for(tmp_path: Path, store: ArtifactStore) -> None:
    base = _small_corpus(tmp_path, 6)
    cfg = make_config(
        corpus=CorpusConfig(sources=[CorpusSource(path="corpus", domain="code")], roots=["corpus"]),
        sharding=ShardingConfig(val_fraction=0.0, workers=1),
    )
    assert prepare_dataset(cfg, store, base_dir=base).manifest.tokens("val") == 0
