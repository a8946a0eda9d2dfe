"""The data-prep pipeline: corpus config in, versioned dataset directory in the store out.

Stages: ingest (read, decode, normalise) -> filter -> exact dedup -> near dedup (MinHash
LSH) -> semantic dedup (optional) -> tokenizer (train or reuse) -> tokenize into shards ->
manifest. Each stage returns a StageReport; `progress(stage, fraction)` is called as they go.

The dataset version is a hash of the inputs' content, every parameter that changes the
output and PIPELINE_VERSION. A complete directory ``datasets/<version>/`` already in the
store is reused as is. A new one is built in a temporary directory next to it and renamed
into place, so a reader never sees a half-written dataset.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from services.data_prep.dedup import exact_dedup, lsh_near_duplicates, signatures_task
from services.data_prep.filters import quality_filter
from services.data_prep.ingest import (
    CorpusError,
    Document,
    EmptyCorpusError,
    FileResult,
    PathOutsideRootsError,
    SourceFile,
    discover_files,
    expand_path,
    read_files,
)
from services.data_prep.sharding import write_shards
from services.data_prep.tokenizer import load_tokenizer, special_ids, token_dtype, train_tokenizer
from shared.artifacts import ArtifactStore, atomic_write_bytes, fsync_dir, sha256_bytes, sha256_file
from shared.data.config import DataPrepConfig
from shared.data.manifest import (
    MANIFEST_NAME,
    HistogramInfo,
    InputsInfo,
    Manifest,
    ManifestError,
    ShardCorruptError,
    StageReport,
    TokenizerInfo,
    check_shard,
    load_manifest,
    write_manifest,
)

PIPELINE_VERSION = "1"
"""Bump whenever a change to this package changes the bytes of a dataset for the same inputs."""

TOKENIZER_FILE = "tokenizer.model"
HISTOGRAM_FILE = "histograms.safetensors"

ProgressFn = Callable[[str, float], None]
T = TypeVar("T")

# Below this much input, worker processes cost more than they save (the output is the same).
_MIN_PARALLEL_BYTES = 4 << 20
_TASK_BYTES = 1 << 19  # input per worker task: amortises pickling, small enough to balance the workers

# Parameters that cannot change a dataset's bytes, left out of its version: where the files
# are (their content and relative paths are in), and how many processes do the work.
_NOT_VERSIONED = ("corpus.roots", "corpus.sources[].path", "sharding.workers", "tokenizer.model_path")


class CorpusChangedError(CorpusError):
    """An input file changed while the pipeline was reading it."""


class ParentDatasetError(CorpusError):
    """tokenizer.from_dataset names a dataset that is not (completely) in the store."""


@dataclass
class PrepareResult:
    manifest: Manifest
    manifest_path: Path
    reused: bool
    reports: list[StageReport]


# --- versioning -------------------------------------------------------------------------


def version_params(config: DataPrepConfig) -> dict[str, Any]:
    """The parameters a dataset version depends on (the config minus _NOT_VERSIONED)."""
    params = config.model_dump(mode="json")
    params["corpus"].pop("roots")
    for src in params["corpus"]["sources"]:
        src.pop("path")
    params["sharding"].pop("workers")
    params["tokenizer"].pop("model_path")
    return params


def dataset_version(config: DataPrepConfig, inputs_digest: str, tokenizer_sha256: str | None = None) -> str:
    """Content-derived version id: inputs, parameters, reused tokenizer and PIPELINE_VERSION."""
    payload = {
        "pipeline_version": PIPELINE_VERSION,
        "params": version_params(config),
        "inputs": inputs_digest,
        "tokenizer": tokenizer_sha256,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return "ds-" + hashlib.sha256(canonical.encode()).hexdigest()[:20]


def hash_inputs(files: list[SourceFile]) -> tuple[list[str], InputsInfo]:
    """SHA-256 of every input file and their combined digest (source, relative path, content)."""
    digests, size = [], 0
    h = hashlib.sha256()
    for sf in files:
        digest = sha256_file(sf.path)
        digests.append(digest)
        size += os.path.getsize(sf.path)
        h.update(f"{sf.source}\0{sf.relpath}\0{digest}\n".encode())
    return digests, InputsInfo(files=len(files), bytes=size, digest=h.hexdigest())


# --- worker pool ------------------------------------------------------------------------


class _InlinePool:
    def imap(self, fn: Callable, it: Iterable) -> Iterator:
        return map(fn, it)


@contextmanager
def _worker_pool(workers: int) -> Iterator[Any]:
    """A process pool (spawn: safe inside a threaded service) or an inline stand-in for 1 worker."""
    if workers <= 1:
        yield _InlinePool()
        return
    pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


# --- the pipeline -----------------------------------------------------------------------


def _chunked(items: list[T], sizes: list[int], target: int = _TASK_BYTES) -> list[list[T]]:
    """Consecutive runs of items of about `target` total size: the tasks of a pool stage."""
    chunks: list[list[T]] = []
    current: list[T] = []
    total = 0
    for item, size in zip(items, sizes, strict=True):
        current.append(item)
        total += size
        if total >= target:
            chunks.append(current)
            current, total = [], 0
    if current:
        chunks.append(current)
    return chunks


def _nbytes(docs: list[Document]) -> int:
    return sum(len(d.text.encode("utf-8")) for d in docs)


def _report(stage: str, docs_in: list[Document], docs_out: list[Document], t0: float, **details: Any) -> StageReport:
    return StageReport(
        stage=stage, docs_in=len(docs_in), docs_out=len(docs_out), bytes_in=_nbytes(docs_in),
        bytes_out=_nbytes(docs_out), seconds=time.perf_counter() - t0, details=details,
    )


def _require_docs(docs: list[Document], report: StageReport, hint: str) -> None:
    if not docs:
        raise EmptyCorpusError(
            f"no document left after {report.stage}: all {report.docs_in} were removed "
            f"({report.details}); {hint}"
        )


def _resolve_tokenizer(
    config: DataPrepConfig, store: ArtifactStore, base_dir: Path
) -> tuple[bytes | None, str | None, str | None, str]:
    """(model bytes, where it came from, parent version, model type) of a reused tokenizer, or Nones."""
    tok = config.tokenizer
    if tok.from_dataset:
        parent_dir = store.path("datasets", tok.from_dataset)
        try:
            parent = load_manifest(parent_dir / MANIFEST_NAME)
        except ManifestError as e:
            raise ParentDatasetError(
                f"tokenizer.from_dataset {tok.from_dataset!r}: {e}; prepare that dataset first"
            ) from e
        path = parent_dir / parent.tokenizer.path
        data = path.read_bytes()
        if sha256_bytes(data) != parent.tokenizer.sha256:
            raise ParentDatasetError(f"tokenizer {path} of dataset {tok.from_dataset} does not match its manifest")
        return data, f"dataset:{tok.from_dataset}", tok.from_dataset, parent.tokenizer.model_type
    if tok.model_path:
        path = expand_path(tok.model_path, base_dir).resolve()
        allowed = [expand_path(r, base_dir).resolve() for r in config.corpus.roots] + [store.root]
        if not any(path == r or r in path.parents for r in allowed):
            raise PathOutsideRootsError(
                f"tokenizer.model_path {tok.model_path!r} ({path}) is outside the corpus roots and the "
                "artifact store: move the file or add its directory to corpus.roots"
            )
        if not path.is_file():
            raise CorpusError(f"tokenizer.model_path {tok.model_path!r} ({path}) does not exist")
        return path.read_bytes(), str(path), None, "external"
    return None, None, None, config.tokenizer.model_type


def plan_version(config: DataPrepConfig, store: ArtifactStore, base_dir: str | Path | None = None) -> str:
    """The version id prepare_dataset would produce for this config and the inputs as they are now."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    _, inputs = hash_inputs(discover_files(config.corpus, base))
    tok_model, *_ = _resolve_tokenizer(config, store, base)
    return dataset_version(config, inputs.digest, sha256_bytes(tok_model) if tok_model else None)


def _complete_dataset(path: Path) -> Manifest | None:
    """The manifest of a complete dataset directory (cheap size checks), else None."""
    try:
        manifest = load_manifest(path / MANIFEST_NAME)
        for shard in manifest.shards:
            check_shard(path, shard, full=False)
    except (ManifestError, ShardCorruptError):
        return None
    return manifest


def prepare_dataset(
    config: DataPrepConfig,
    store: ArtifactStore,
    progress: ProgressFn | None = None,
    *,
    base_dir: str | Path | None = None,
) -> PrepareResult:
    """Build (or reuse) the dataset the config describes in ``<store>/datasets/<version>/``.

    Relative corpus paths resolve against base_dir (default: the working directory). Raises a
    CorpusError subclass (EmptyCorpusError, PathOutsideRootsError, SourceNotFoundError,
    CorpusFormatError, ParentDatasetError, ...), TokenizerError or SemanticDedupError, each
    naming what to fix. Worker processes are spawned: a script calling this needs the
    ``if __name__ == "__main__":`` guard.
    """
    report_progress = progress or (lambda stage, fraction: None)
    base = Path(base_dir) if base_dir is not None else Path.cwd()

    files = discover_files(config.corpus, base)
    file_digests, inputs = hash_inputs(files)
    tok_model, tok_source, parent_version, tok_type = _resolve_tokenizer(config, store, base)
    version = dataset_version(config, inputs.digest, sha256_bytes(tok_model) if tok_model else None)
    final = store.path("datasets", version)
    if final.exists():
        existing = _complete_dataset(final)
        if existing is not None:
            report_progress("manifest", 1.0)
            return PrepareResult(existing, final / MANIFEST_NAME, True, existing.stages)
        trash = final.with_name(f".broken-{version}-{uuid.uuid4().hex[:8]}")
        final.rename(trash)  # incomplete leftovers: rebuilt below
        shutil.rmtree(trash, ignore_errors=True)

    workers = config.sharding.workers or os.cpu_count() or 1
    if inputs.bytes < _MIN_PARALLEL_BYTES:
        workers = 1
    tmp = store.path("datasets", f".tmp-{version}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        with _worker_pool(workers) as pool:
            manifest, reports = _build(
                config, files, file_digests, inputs, version, tok_model, tok_source, tok_type, parent_version,
                tmp, pool, report_progress, workers,
            )
        write_manifest(manifest, tmp / MANIFEST_NAME)
        fsync_dir(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process renamed the same version into place first: theirs is identical.
            existing = _complete_dataset(final)
            if existing is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return PrepareResult(existing, final / MANIFEST_NAME, True, existing.stages)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report_progress("manifest", 1.0)
    return PrepareResult(load_manifest(final / MANIFEST_NAME), final / MANIFEST_NAME, False, reports)


def _build(
    config: DataPrepConfig,
    files: list[SourceFile],
    file_digests: list[str],
    inputs: InputsInfo,
    version: str,
    tok_model: bytes | None,
    tok_source: str | None,
    tok_type: str,
    parent_version: str | None,
    out: Path,
    pool: Any,
    report_progress: ProgressFn,
    workers: int,
) -> tuple[Manifest, list[StageReport]]:
    reports: list[StageReport] = []

    # 1. ingest and normalise
    t0 = time.perf_counter()
    report_progress("ingest", 0.0)
    chunks = _chunked(files, [os.path.getsize(f.path) for f in files])
    results: list[FileResult] = []
    for n, part in enumerate(pool.imap(read_files, chunks), start=1):
        results.extend(part)
        report_progress("ingest", n / len(chunks))
    for res, digest in zip(results, file_digests, strict=True):
        if res.sha256 != digest:
            raise CorpusChangedError(f"{res.file.path} changed while data prep was reading it: run it again")
    docs = [doc for res in results for doc in res.docs]
    binary = [f"{r.file.source}:{r.file.relpath}" for r in results if r.binary]
    non_utf8 = [f"{r.file.source}:{r.file.relpath}" for r in results if r.replaced_chars]
    ingest = StageReport(
        stage="ingest", docs_in=len(files), docs_out=len(docs), bytes_in=inputs.bytes, bytes_out=_nbytes(docs),
        seconds=time.perf_counter() - t0,
        details={
            "files": len(files),
            "binary_skipped": len(binary),
            "binary_files": binary[:100],
            "non_utf8_files": len(non_utf8),
            "non_utf8_examples": non_utf8[:100],
            "replaced_chars": sum(r.replaced_chars for r in results),
            "unparseable_python": sum(r.unparseable for r in results),
        },
    )
    reports.append(ingest)
    if not docs:
        raise EmptyCorpusError(
            f"the corpus has no document: {len(files)} files found, {len(binary)} binary, "
            f"{ingest.details['unparseable_python']} unparseable; check corpus.sources"
        )

    # filters
    t0 = time.perf_counter()
    kept, removed = quality_filter(docs, config.filters)
    reports.append(_report("filter", docs, kept, t0, **{k: removed.get(k, 0) for k in sorted(removed)}))
    _require_docs(kept, reports[-1], "relax the filters.* settings")
    report_progress("filter", 1.0)
    docs = kept

    # 2. exact dedup
    t0 = time.perf_counter()
    report_progress("exact_dedup", 0.0)
    kept, _ = exact_dedup(docs)
    reports.append(_report("exact_dedup", docs, kept, t0))
    report_progress("exact_dedup", 1.0)
    docs = kept

    # 3. near dedup
    mh = config.minhash
    if mh.enabled:
        t0 = time.perf_counter()
        report_progress("near_dedup", 0.0)
        texts = [d.text for d in docs]
        tasks = [(part, mh.ngram, mh.num_perm, mh.seed) for part in _chunked(texts, [len(t) for t in texts])]
        parts = []
        for n, sig in enumerate(pool.imap(signatures_task, tasks), start=1):
            parts.append(sig)
            report_progress("near_dedup", 0.9 * n / len(tasks))
        near = lsh_near_duplicates(np.concatenate(parts), mh.threshold, texts, mh.ngram)
        kept = [d for d, k in zip(docs, near.keep, strict=True) if k]
        reports.append(_report(
            "near_dedup", docs, kept, t0, bands=near.bands, rows=near.rows,
            candidate_pairs=near.candidate_pairs, verified_pairs=near.verified_pairs, clusters=near.clusters,
        ))
        report_progress("near_dedup", 1.0)
        docs = kept

    # 4. semantic dedup
    sem = config.semantic
    if sem.enabled:
        from services.data_prep.semantic import embed, load_embedder, semantic_duplicates

        t0 = time.perf_counter()
        report_progress("semantic_dedup", 0.0)
        model = load_embedder(sem.model)
        emb = embed(model, [d.text for d in docs], sem.max_chars, sem.batch_size,
                    progress=lambda f: report_progress("semantic_dedup", 0.9 * f))
        result = semantic_duplicates(emb, sem.n_clusters, sem.threshold, sem.kmeans_iters, sem.seed)
        kept = [d for d, k in zip(docs, result.keep.tolist(), strict=True) if k]
        reports.append(_report("semantic_dedup", docs, kept, t0, clusters=result.clusters, pairs=len(result.pairs)))
        report_progress("semantic_dedup", 1.0)
        docs = kept

    # 5. tokenizer
    t0 = time.perf_counter()
    report_progress("tokenizer", 0.0)
    trained = tok_model is None
    if trained:
        tok_model = train_tokenizer([d.text for d in docs], config.tokenizer)
    sp = load_tokenizer(tok_model)
    vocab = sp.vocab_size()
    ids = special_ids(sp)
    atomic_write_bytes(out / TOKENIZER_FILE, tok_model)
    tokenizer = TokenizerInfo(
        path=TOKENIZER_FILE, sha256=sha256_bytes(tok_model), size_bytes=len(tok_model), vocab_size=vocab,
        model_type=config.tokenizer.model_type if trained else tok_type, pad_id=ids["pad"],
        unk_id=ids["unk"], bos_id=ids["bos"], eos_id=ids["eos"], trained=trained, source=tok_source,
    )
    reports.append(StageReport(
        stage="tokenizer", docs_in=len(docs), docs_out=len(docs), bytes_in=_nbytes(docs),
        bytes_out=len(tok_model), seconds=time.perf_counter() - t0,
        details={"trained": trained, "vocab_size": vocab, "source": tok_source},
    ))
    report_progress("tokenizer", 1.0)

    # 6. tokenize into shards
    t0 = time.perf_counter()
    report_progress("tokenize", 0.0)
    dtype = token_dtype(vocab)
    sh = config.sharding
    sharded = write_shards(
        docs, out / TOKENIZER_FILE, vocab, dtype, out, sh.shard_tokens, sh.val_fraction, sh.seed,
        imap=pool.imap, progress=lambda f: report_progress("tokenize", f),
    )
    from safetensors.numpy import save

    hist_bytes = save(sharded.histograms, metadata={"dataset_version": version, "vocab_size": str(vocab)})
    atomic_write_bytes(out / HISTOGRAM_FILE, hist_bytes)
    reports.append(StageReport(
        stage="tokenize", docs_in=len(docs), docs_out=len(docs), bytes_in=_nbytes(docs),
        bytes_out=sum(s.size_bytes for s in sharded.shards), seconds=time.perf_counter() - t0,
        details={
            "tokens": sum(s.tokens for s in sharded.shards),
            "shards": len(sharded.shards),
            "workers": workers,
        },
    ))

    report_progress("manifest", 0.0)
    manifest = Manifest(
        version=version,
        parent_version=parent_version,
        pipeline_version=PIPELINE_VERSION,
        config=config.model_dump(mode="json"),
        inputs=inputs,
        dtype=dtype,
        tokenizer=tokenizer,
        shards=sharded.shards,
        domains=sharded.domains,
        stages=reports,
        histograms=HistogramInfo(
            path=HISTOGRAM_FILE, sha256=sha256_bytes(hist_bytes), size_bytes=len(hist_bytes),
            keys=list(sharded.histograms),
        ),
    )
    return manifest, reports


