"""The dataset manifest (``manifest.json``): what a prepared dataset holds and how to check it.

A dataset lives in one directory of the artifact store, ``datasets/<version>/``::

    manifest.json                  this file's model, `Manifest`
    tokenizer.model                sentencepiece model
    histograms.safetensors         unigram token counts per split/domain (drift baseline)
    dedup_report.jsonl             every document dedup removed, and which kept one it duplicates
    train/<domain>/shard_00000.bin flat token ids, documents separated by EOS
    val/<domain>/shard_00000.bin

A RAG-packed dataset (``rag`` set, schema 2) holds fixed-size windows instead of a flat stream:
each shard is a run of records of ``rag.record_tokens`` tokens (pad, retrieved chunks wrapped in
``<ctx>``/``</ctx>``, the ``<doc>`` marker, then the base text), and beside it
``shard_00000.mask.bin`` holds one uint8 per token saying what it is (``rag.mask_kinds``: 0 pad,
1 retrieved or boundary, 2 base), from which the loss weights follow (``RagInfo.weights``). The
local retrieval index lives in ``rag_index/`` (`RetrievalIndexInfo`).

Shard paths in the manifest are relative to that directory, so a dataset can be moved.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, computed_field

from shared.artifacts import atomic_write_bytes, sha256_file

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION = 2
"""The newest schema this reader knows. 1: flat token shards; 2: RAG-packed shards (`Manifest.rag`)."""
PACKED_SCHEMA_VERSION = 2
Split = Literal["train", "val"]
SPLITS: tuple[Split, ...] = ("train", "val")


class ManifestError(ValueError):
    """A manifest is missing, unreadable or not a Helox dataset manifest."""


class ShardCorruptError(RuntimeError):
    """A shard's bytes do not match the manifest (size or SHA-256). The message names the file."""


class _Model(BaseModel):
    # Readers ignore fields written by newer pipeline versions.
    model_config = ConfigDict(extra="ignore")


class StageReport(_Model):
    """What one pipeline stage did: documents in/out, bytes, time and stage-specific counts.

    Ingest reads files and removes no document: its docs_in and docs_out are the documents the
    files yielded (a JSONL file yields one per record), files_in the files read and
    files_skipped those that yielded none (binary, unparseable Python).
    """

    stage: str
    docs_in: int = 0
    docs_out: int = 0
    files_in: int | None = None
    files_skipped: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    details: dict[str, Any] = Field(default_factory=dict)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def removed(self) -> int:
        return self.docs_in - self.docs_out

    @property
    def mb_per_s(self) -> float:
        return self.bytes_in / 1e6 / self.seconds if self.seconds > 0 else float("inf")


class MaskFileInfo(_Model):
    """The per-token kinds of a packed shard (uint8, one per token of the shard)."""

    path: str = Field(description="Relative to the dataset directory.")
    sha256: str
    size_bytes: int


class ShardInfo(_Model):
    path: str = Field(description="Relative to the dataset directory.")
    split: Split
    domain: str
    sha256: str
    size_bytes: int
    documents: int = Field(description="Documents (flat shards) or records (packed shards).")
    tokens: int
    dtype: Literal["uint16", "uint32"]
    mask: MaskFileInfo | None = Field(default=None, description="Packed datasets: the token kinds file.")


class DomainStats(_Model):
    documents: int = 0
    text_bytes: int = 0
    train_documents: int = 0
    train_tokens: int = 0
    val_documents: int = 0
    val_tokens: int = 0


class TokenizerInfo(_Model):
    path: str = Field(description="Relative to the dataset directory.")
    sha256: str
    size_bytes: int
    vocab_size: int
    model_type: str
    pad_id: int
    unk_id: int
    bos_id: int
    eos_id: int
    trained: bool = Field(description="False when reused from a file or a parent dataset.")
    source: str | None = Field(default=None, description="Where a reused tokenizer came from.")


class HistogramInfo(_Model):
    """Unigram token counts, one int64 vector of length vocab_size per '<split>/<domain>'."""

    path: str
    sha256: str
    size_bytes: int
    format: Literal["safetensors"] = "safetensors"
    keys: list[str]


class InputFile(_Model):
    """One input file: which corpus source found it, its path relative to that source, its content digest."""

    source: int
    path: str
    sha256: str
    bytes: int


class InputsInfo(_Model):
    files: int
    bytes: int
    digest: str = Field(
        description="SHA-256 over the lines f'{source}\\0{path}\\0{sha256}\\n' of per_file, in order: the version's input."
    )
    per_file: list[InputFile] = Field(default_factory=list, description="Every input file, in reading order.")


class DedupReportInfo(_Model):
    """The dedup report: one JSON line per removed document.

    Each line: stage (exact_dedup, near_dedup, semantic_dedup), removed and duplicate_of (document
    origins, '<source>:<path>' or '<source>:<path>:<line>' for JSONL records; duplicate_of is a
    kept document), removed_sha256 (of the normalised text), domain, measure (sha256, jaccard,
    cosine), similarity (removed vs duplicate_of: 1.0 for exact copies, the exact word n-gram
    Jaccard, the embedding cosine) and, when the decision was made against another removed
    document, via (that document's origin).
    """

    path: str
    sha256: str
    size_bytes: int
    records: dict[str, int] = Field(default_factory=dict, description="Removed documents per stage.")


MASK_PAD, MASK_CONTEXT, MASK_BASE = 0, 1, 2
"""Token kinds of a packed shard's mask file."""


class RetrievalIndexInfo(_Model):
    """The local BM25 index (shared.retrieval.LocalIndex) saved with the dataset."""

    path: str = Field(description="Directory, relative to the dataset directory.")
    sha256: str = Field(description="shared.retrieval.index_digest of the directory.")
    files: dict[str, str] = Field(description="File name -> SHA-256.")
    size_bytes: int
    method: Literal["bm25"] = "bm25"
    chunks: int
    documents: int = Field(description="Documents (flat shards) or records (packed shards).")
    chunk_tokens: int


class RetrievalFallbackInfo(_Model):
    """One fallback: which retriever was given up on, for what, why, and how many queries it cost."""

    from_retriever: str | None
    to_retriever: str
    reason: str
    queries: int
    split: str | None = None


class RetrievalReportInfo(_Model):
    """retrieval_report.jsonl: one line per window: window ('<split>/<domain>/<n>', n its record in
    that stream), sources (origins of the documents its base text covers), retriever (which one
    served it) and chunks ([{chunk_id, source_id}], those packed, in order)."""

    path: str
    sha256: str
    size_bytes: int


class RagInfo(_Model):
    """What the retrieval stage did and how to read the packed shards."""

    seq_len: int = Field(description="Window length; a record holds seq_len + 1 tokens.")
    record_tokens: int
    context_budget: float
    context_loss_weight: float
    boundary_ids: dict[str, int] = Field(description="'<ctx>', '</ctx>', '<doc>' -> token id.")
    mask_kinds: dict[str, int] = Field(default_factory=lambda: {"pad": MASK_PAD, "context": MASK_CONTEXT,
                                                                "base": MASK_BASE})
    retriever: str = Field(description="Retriever chosen at discovery: 'local-bm25' or 'cyrex:<instance>'.")
    retriever_index_digest: str | None = Field(default=None, description="The chosen retriever's index digest.")
    index: RetrievalIndexInfo
    windows: dict[str, int] = Field(description="Windows per split.")
    queries_by_retriever: dict[str, int] = Field(description="Queries each retriever answered.")
    chunks_by_retriever: dict[str, int] = Field(description="Packed chunks each retriever served.")
    fallbacks: list[RetrievalFallbackInfo] = Field(default_factory=list)
    leakage_rejected: int = Field(default=0, description="Retrieved chunks dropped by the leakage rule (own "
                                  "document, its duplicates, validation documents).")
    tokens: dict[str, int] = Field(description="Tokens per kind over every record: pad, context, base.")
    report: RetrievalReportInfo

    @property
    def weights(self) -> list[float]:
        """Loss weight per mask kind (index = kind)."""
        return [0.0, self.context_loss_weight, 1.0]


class Manifest(_Model):
    schema_version: int = Field(default=1, description="1 for flat shards, 2 (PACKED_SCHEMA_VERSION) when packed.")
    version: str
    parent_version: str | None = None
    pipeline_version: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    config: dict[str, Any] = Field(description="The DataPrepConfig that produced this dataset.")
    inputs: InputsInfo
    dtype: Literal["uint16", "uint32"]
    tokenizer: TokenizerInfo
    shards: list[ShardInfo]
    domains: dict[str, DomainStats]
    stages: list[StageReport]
    histograms: HistogramInfo
    dedup_report: DedupReportInfo | None = Field(default=None, description="None in datasets of pipeline version 1.")
    rag: RagInfo | None = Field(default=None, description="Set when the shards are RAG-packed windows.")

    def shards_for(self, split: Split, domain: str | None = None) -> list[ShardInfo]:
        """Shards of a split (optionally one domain), in stream order."""
        return [s for s in self.shards if s.split == split and (domain is None or s.domain == domain)]

    def tokens(self, split: Split) -> int:
        return sum(s.tokens for s in self.shards_for(split))

    @property
    def domain_names(self) -> list[str]:
        return sorted(self.domains)


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file (or the manifest inside a dataset directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    try:
        raw = p.read_text("utf-8")
    except FileNotFoundError:
        raise ManifestError(f"no dataset manifest at {p}: run data prep first or check the path") from None
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as e:
        raise ManifestError(f"{p} is not a valid dataset manifest: {e}") from e
    if manifest.schema_version > MANIFEST_SCHEMA_VERSION:
        raise ManifestError(
            f"{p} has manifest schema {manifest.schema_version}, this reader knows up to "
            f"{MANIFEST_SCHEMA_VERSION}: upgrade Helox"
        )
    return manifest


def write_manifest(manifest: Manifest, path: str | Path) -> Path:
    """Write a manifest atomically."""
    data = json.dumps(manifest.model_dump(mode="json"), indent=1, sort_keys=False).encode()
    return atomic_write_bytes(path, data)


def check_shard(dataset_dir: Path, shard: ShardInfo, full: bool = False) -> Path:
    """Check a shard against its manifest entry: size always, SHA-256 when `full`.

    Raises ShardCorruptError naming the file.
    """
    p = dataset_dir / shard.path
    if not p.is_file():
        raise ShardCorruptError(f"shard {p} is missing (listed in the manifest): re-run data prep")
    size = p.stat().st_size
    itemsize = np.dtype(shard.dtype).itemsize
    if size != shard.size_bytes or size != shard.tokens * itemsize:
        raise ShardCorruptError(
            f"shard {p} has {size} bytes, the manifest says {shard.size_bytes} "
            f"({shard.tokens} {shard.dtype} tokens): the file is truncated or replaced; re-run data prep"
        )
    if full:
        digest = sha256_file(p)
        if digest != shard.sha256:
            raise ShardCorruptError(
                f"shard {p} has SHA-256 {digest}, the manifest says {shard.sha256}: "
                "the file is corrupt; re-run data prep"
            )
    if shard.mask is not None:
        m = dataset_dir / shard.mask.path
        if not m.is_file() or m.stat().st_size != shard.mask.size_bytes or shard.mask.size_bytes != shard.tokens:
            raise ShardCorruptError(f"mask file {m} of shard {p} is missing or has the wrong size: re-run data prep")
        if full and sha256_file(m) != shard.mask.sha256:
            raise ShardCorruptError(f"mask file {m} of shard {p} does not match its SHA-256: re-run data prep")
    return p


class VerifyReport(BaseModel):
    """Result of verify_dataset: every problem found, not just the first."""

    manifest: str
    version: str
    checked_files: int
    full: bool
    problems: list[str] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_for_problems(self) -> None:
        """Raise ShardCorruptError listing every problem."""
        if self.problems:
            raise ShardCorruptError(f"dataset {self.version} failed verification: " + "; ".join(self.problems))


def verify_dataset(manifest_path: str | Path, full: bool = True) -> VerifyReport:
    """Re-check every shard, the tokenizer and the histogram file against the manifest."""
    mpath = Path(manifest_path)
    if mpath.is_dir():
        mpath = mpath / MANIFEST_NAME
    manifest = load_manifest(mpath)
    root = mpath.parent
    report = VerifyReport(manifest=str(mpath), version=manifest.version, checked_files=0, full=full)
    for shard in manifest.shards:
        report.checked_files += 1
        try:
            check_shard(root, shard, full=full)
        except ShardCorruptError as e:
            report.problems.append(str(e))
    files = [
        ("tokenizer", manifest.tokenizer.path, manifest.tokenizer.sha256, manifest.tokenizer.size_bytes),
        ("histograms", manifest.histograms.path, manifest.histograms.sha256, manifest.histograms.size_bytes),
    ]
    if manifest.dedup_report is not None:
        r = manifest.dedup_report
        files.append(("dedup report", r.path, r.sha256, r.size_bytes))
    if manifest.rag is not None:
        r = manifest.rag.report
        files.append(("retrieval report", r.path, r.sha256, r.size_bytes))
        index = manifest.rag.index
        for fname, sha in index.files.items():
            report.checked_files += 1
            p = root / index.path / fname
            if not p.is_file():
                report.problems.append(f"retrieval index file {p} is missing")
            elif full and sha256_file(p) != sha:
                report.problems.append(f"retrieval index file {p} does not match its SHA-256 in the manifest")
    for name, rel, sha, size in files:
        report.checked_files += 1
        p = root / rel
        if not p.is_file():
            report.problems.append(f"{name} file {p} is missing")
        elif p.stat().st_size != size:
            report.problems.append(f"{name} file {p} has {p.stat().st_size} bytes, the manifest says {size}")
        elif full and sha256_file(p) != sha:
            report.problems.append(f"{name} file {p} does not match its SHA-256 in the manifest")
    return report


def load_histograms(manifest_path: str | Path) -> dict[str, np.ndarray]:
    """Unigram token counts keyed '<split>/<domain>' (int64 vectors of length vocab_size)."""
    from safetensors.numpy import load_file

    mpath = Path(manifest_path)
    if mpath.is_dir():
        mpath = mpath / MANIFEST_NAME
    manifest = load_manifest(mpath)
    return load_file(str(mpath.parent / manifest.histograms.path))


def inspect_dataset(manifest_path: str | Path) -> dict[str, Any]:
    """A summary of a dataset for humans and the CLI: totals, per-domain counts, stages, tokenizer."""
    manifest = load_manifest(manifest_path)
    return {
        "version": manifest.version,
        "parent_version": manifest.parent_version,
        "pipeline_version": manifest.pipeline_version,
        "created_at": manifest.created_at.isoformat(),
        "inputs": manifest.inputs.model_dump(),
        "tokenizer": {
            "vocab_size": manifest.tokenizer.vocab_size,
            "model_type": manifest.tokenizer.model_type,
            "trained": manifest.tokenizer.trained,
            "special_ids": {
                "pad": manifest.tokenizer.pad_id,
                "unk": manifest.tokenizer.unk_id,
                "bos": manifest.tokenizer.bos_id,
                "eos": manifest.tokenizer.eos_id,
            },
        },
        "dtype": manifest.dtype,
        "tokens": {split: manifest.tokens(split) for split in SPLITS},
        "shards": len(manifest.shards),
        "bytes": sum(s.size_bytes for s in manifest.shards),
        "domains": {name: stats.model_dump() for name, stats in sorted(manifest.domains.items())},
        "stages": [
            {"stage": s.stage, "docs_in": s.docs_in, "docs_out": s.docs_out, "removed": s.removed,
             "files_in": s.files_in, "files_skipped": s.files_skipped, "seconds": round(s.seconds, 3)}
            for s in manifest.stages
        ],
        "dedup_report": manifest.dedup_report.model_dump() if manifest.dedup_report else None,
        "rag": manifest.rag.model_dump(mode="json", exclude={"index": {"files"}}) if manifest.rag else None,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """Render inspect_dataset's summary as a few aligned lines of text."""
    tok = summary["tokenizer"]
    lines = [
        f"dataset {summary['version']}"
        + (f" (parent {summary['parent_version']})" if summary["parent_version"] else ""),
        f"  pipeline {summary['pipeline_version']}, created {summary['created_at']}",
        f"  inputs: {summary['inputs']['files']} files, {summary['inputs']['bytes'] / 1e6:.1f} MB",
        f"  tokenizer: {tok['model_type']} vocab {tok['vocab_size']} ({'trained' if tok['trained'] else 'reused'}), "
        + ", ".join(f"{k}={v}" for k, v in tok["special_ids"].items()),
        f"  tokens: train {summary['tokens']['train']:,}, val {summary['tokens']['val']:,} "
        f"({summary['dtype']}, {summary['shards']} shards, {summary['bytes'] / 1e6:.1f} MB)",
        "  domains:",
    ]
    for name, d in summary["domains"].items():
        lines.append(
            f"    {name:<12} docs {d['documents']:>8,}  train tokens {d['train_tokens']:>12,}  "
            f"val tokens {d['val_tokens']:>10,}"
        )
    lines.append("  stages:")
    for s in summary["stages"]:
        files = s.get("files_in")
        lines.append(
            f"    {s['stage']:<15} in {s['docs_in']:>8,}  out {s['docs_out']:>8,}  removed {s['removed']:>7,}  "
            f"{s['seconds']:>8.2f}s"
            + (f"  (files {files:,} ({s.get('files_skipped') or 0:,} skipped))" if files is not None else "")
        )
    report = summary.get("dedup_report")
    if report:
        counts = ", ".join(f"{k} {v:,}" for k, v in report["records"].items()) or "nothing removed"
        lines.append(f"  dedup report: {report['path']} ({counts})")
    rag = summary.get("rag")
    if rag:
        served = ", ".join(f"{k} {v:,}" for k, v in rag["queries_by_retriever"].items())
        lines.append(
            f"  rag: windows of {rag['seq_len']} tokens (train {rag['windows']['train']:,}, val {rag['windows']['val']:,}), "
            f"retriever {rag['retriever']}; queries answered: {served}; retrieved share "
            f"{rag['tokens']['context'] / max(sum(rag['tokens'].values()), 1):.0%}; "
            f"{rag['leakage_rejected']:,} chunks dropped by the leakage rule"
        )
        for f in rag["fallbacks"]:
            lines.append(f"  rag FALLBACK: {f['from_retriever'] or 'no retriever'} -> {f['to_retriever']} "
                         f"for {f['queries']:,} queries: {f['reason']}")
    return "\n".join(lines)
