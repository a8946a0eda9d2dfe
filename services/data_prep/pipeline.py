"""The data-prep pipeline: corpus config in, versioned dataset directory in the store out.

Stages: ingest (read, decode, normalise) -> filter -> exact dedup -> near dedup (MinHash
LSH, candidates verified on their exact Jaccard) -> semantic dedup (optional) -> split check
-> tokenizer (train or reuse) -> tokenize into shards -> retrieval (only with a `rag` section:
retrieved context packed into fixed windows, services/data_prep/retrieval.py) -> manifest.
Each stage returns a StageReport; `progress(stage, fraction)` is called as they go.

Lineage: the manifest lists the SHA-256 of every input file (inputs.per_file), and the dedup
report (dedup_report.jsonl, its digest in the manifest) names every document a dedup stage
removed and the kept document it duplicates.

The dataset version is a hash of the inputs' content (the per-file digests), every parameter
that changes the output and PIPELINE_VERSION. A directory ``datasets/<version>/`` already in
the store is reused only after every file in it matches its SHA-256 in the manifest;
otherwise it is rebuilt (PrepareResult.status says which happened, and why). A new one is
built in a temporary directory next to it and renamed into place, so a reader never sees a
half-written dataset.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from services.data_prep.dedup import exact_dedup, lsh_near_duplicates
from services.data_prep.ingest import (
    CorpusError,
    Document,
    EmptyCorpusError,
    FileResult,
    PathOutsideRootsError,
    SourceFile,
    discover_files,
    expand_path,
)
from services.data_prep.sharding import histogram_file_bytes, is_validation, validation_score, write_shards
from services.data_prep.tasks import ingest_task
from services.data_prep.tokenizer import load_tokenizer, special_ids, token_dtype, train_tokenizer, user_defined_ids
from shared.artifacts import ArtifactStore, atomic_write_bytes, fsync_dir, sha256_bytes, sha256_file
from shared.data.config import RAG_BOUNDARY_TOKENS, DataPrepConfig, ShardingConfig
from shared.data.manifest import (
    MANIFEST_NAME,
    PACKED_SCHEMA_VERSION,
    DedupReportInfo,
    HistogramInfo,
    InputFile,
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
from shared.logging import get_logger

if TYPE_CHECKING:  # the retrieval modules (BM25, the bus) are imported only when a dataset is RAG-packed
    from services.data_prep.retrieval import RetrieverChoice
    from shared.retrieval import SynapseLink

PIPELINE_VERSION = "3"
"""Bump whenever a change to this package changes the bytes of a dataset for the same inputs.

2: near-duplicate candidates decided on their exact Jaccard (21x6 bands at 0.8/128); the
dedup report and per-file input digests. 3: the tokenizer is trained with 2 threads (the
count is recorded in the model file).
"""

TOKENIZER_FILE = "tokenizer.model"
HISTOGRAM_FILE = "histograms.safetensors"
DEDUP_REPORT_FILE = "dedup_report.jsonl"

log = get_logger("helox.data_prep")

ProgressFn = Callable[[str, float], None]
T = TypeVar("T")

# Below this much input, worker processes cost more than they save (the output is the same).
_MIN_PARALLEL_BYTES = 4 << 20
_TASK_BYTES = 1 << 19  # input per worker task: amortises pickling, small enough to balance the workers

# Parameters that cannot change a dataset's bytes, left out of its version: where the files
# are (their content and relative paths are in), and how many processes do the work.
_NOT_VERSIONED = ("corpus.roots", "corpus.sources[].path", "sharding.workers", "tokenizer.model_path",
                  "rag.discovery_timeout_s", "rag.indexing_wait_s", "rag.request_timeout_s", "rag.batch_queries")
"""(How long to wait for a retriever changes a dataset only through fallbacks, which change its version.)"""


class CorpusChangedError(CorpusError):
    """An input file changed while the pipeline was reading it."""


class ParentDatasetError(CorpusError):
    """tokenizer.from_dataset names a dataset that is not (completely) in the store."""


class EmptySplitError(CorpusError):
    """sharding.val_fraction leaves the training or the validation split without a document."""


@dataclass
class PrepareResult:
    manifest: Manifest
    manifest_path: Path
    reused: bool
    reports: list[StageReport]
    status: str = ""
    """'built', 'reused (verified N shards by SHA-256)' or 'rebuilt: <what failed>'."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds outside the stage reports: discover, hash_inputs, verify_existing, pool_start (how
    long the stages waited for the workers to start: they start once the dataset is known to be
    built, and this process runs ingest tasks itself until they have), manifest (histograms, dedup report and manifest
    written) and total (the whole call)."""


# --- versioning -------------------------------------------------------------------------


def version_params(config: DataPrepConfig) -> dict[str, Any]:
    """The parameters a dataset version depends on (the config minus _NOT_VERSIONED)."""
    params = config.model_dump(mode="json")
    params["corpus"].pop("roots")
    for src in params["corpus"]["sources"]:
        src.pop("path")
    params["sharding"].pop("workers")
    params["tokenizer"].pop("model_path")
    if params.get("rag") is None:
        params.pop("rag", None)  # versions of unpacked datasets stay what they were
    else:
        for name in ("discovery_timeout_s", "indexing_wait_s", "request_timeout_s", "batch_queries"):
            params["rag"].pop(name)
    return params


def dataset_version(config: DataPrepConfig, inputs_digest: str, tokenizer_sha256: str | None = None,
                    retrieval: dict[str, Any] | None = None) -> str:
    """Content-derived version id: inputs, parameters, reused tokenizer, PIPELINE_VERSION and, for a
    RAG-packed dataset, the retriever and its index digest (RetrieverChoice.identity; after a fallback
    mid-run, also the packed shards' digest)."""
    payload: dict[str, Any] = {
        "pipeline_version": PIPELINE_VERSION,
        "params": version_params(config),
        "inputs": inputs_digest,
        "tokenizer": tokenizer_sha256,
    }
    if retrieval is not None:
        payload["retrieval"] = retrieval
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return "ds-" + hashlib.sha256(canonical.encode()).hexdigest()[:20]


def hash_inputs(files: list[SourceFile]) -> tuple[list[str], InputsInfo]:
    """SHA-256 of every input file, listed per file, and their combined digest (source, relative
    path, content), which the dataset version is derived from."""
    digests, per_file = [], []
    h = hashlib.sha256()
    for sf in files:
        digest = sha256_file(sf.path)
        digests.append(digest)
        per_file.append(InputFile(source=sf.source, path=sf.relpath, sha256=digest, bytes=os.path.getsize(sf.path)))
        h.update(f"{sf.source}\0{sf.relpath}\0{digest}\n".encode())
    size = sum(f.bytes for f in per_file)
    return digests, InputsInfo(files=len(files), bytes=size, digest=h.hexdigest(), per_file=per_file)


# --- worker pool ------------------------------------------------------------------------


class _InlinePool:
    def imap(self, fn: Callable, it: Iterable) -> Iterator:
        return map(fn, it)


_WORKER_MODULES = ("services.data_prep.tasks", "services.data_prep.sharding")


def _pool_context() -> Any:
    """forkserver: safe inside a threaded service like spawn, but the modules are imported once, in
    the server, and every worker is a fork of it (spawn imported them, and the main module, in each).
    The server preloads the main module too (a spawned or forked child imports it, unless its server
    already has): by path for a script, by name for `python -m`."""
    ctx = multiprocessing.get_context("forkserver")
    preload = ["__main__", *_WORKER_MODULES]
    name = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None)
    if name and name != "__main__" and not name.endswith(".__main__"):
        preload.insert(1, name)
    ctx.set_forkserver_preload(preload)  # no effect once this process's server runs: it keeps its modules
    return ctx


class _PoolStart:
    """A worker pool started in the background (start()): this process runs the first ingest tasks
    itself while the workers start (imap). get() waits for it (an inline stand-in for 1 worker);
    close() ends it."""

    waited_s = 0.0
    """Seconds the caller waited in get() for the workers to start."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: Any = None
        self._error: BaseException | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the workers (in the background; no-op for 1 worker or when started)."""
        if self.workers > 1 and self._thread is None:
            self._thread = threading.Thread(target=self._start, name="data-prep-pool-start", daemon=True)
            self._thread.start()

    def _start(self) -> None:
        try:
            pool = _pool_context().Pool(self.workers)
        except BaseException as e:  # raised in the caller by get()
            self._error = e
            return
        with self._lock:
            if not self._closed:
                self._pool = pool
                return
        _end_pool(pool)  # closed while it started (a stage failed)

    def ready(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def get(self) -> Any:
        if self.workers <= 1:
            return _InlinePool()
        self.start()
        t0 = time.perf_counter()
        self._thread.join()
        self.waited_s += time.perf_counter() - t0
        if self._error is not None:
            raise self._error
        return self._pool

    def imap(self, fn: Callable[[Any], T], tasks: list[Any]) -> Iterator[T]:
        """fn over tasks, results in order: this process runs them itself until the workers have
        started, then the workers run the rest."""
        i = 0
        while i < len(tasks) and not self.ready():
            yield fn(tasks[i])
            i += 1
        if i < len(tasks):
            yield from self.get().imap(fn, tasks[i:])

    def close(self) -> None:
        """End the workers (a pool still starting ends itself once started)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if self._thread is not None:
            self._thread.join()
        if pool is not None:
            _end_pool(pool)


def _end_pool(pool: Any) -> None:
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


class _ByteCounter:
    """UTF-8 bytes of documents' texts, each document's counted once (the stage reports count the
    same documents again and again: each pass over the corpus took ~20 ms)."""

    def __init__(self) -> None:
        self._sizes: dict[int, tuple[Document, int]] = {}  # id -> (the document, kept alive, its bytes)

    def __call__(self, docs: list[Document]) -> int:
        total = 0
        for d in docs:
            known = self._sizes.get(id(d))
            if known is None or known[0] is not d:
                known = self._sizes[id(d)] = (d, len(d.text.encode("utf-8")))
            total += known[1]
        return total


def _report(stage: str, docs_in: list[Document], docs_out: list[Document], t0: float, nbytes: _ByteCounter,
            **details: Any) -> StageReport:
    return StageReport(
        stage=stage, docs_in=len(docs_in), docs_out=len(docs_out), bytes_in=nbytes(docs_in),
        bytes_out=nbytes(docs_out), seconds=time.perf_counter() - t0, details=details,
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


def _choose_retriever(config: DataPrepConfig, synapse: SynapseLink | None) -> RetrieverChoice | None:
    if config.rag is None:
        return None
    from services.data_prep.retrieval import choose_retriever

    return choose_retriever(config.rag, synapse)


def _announce_reused_fallbacks(manifest: Manifest, synapse: SynapseLink | None) -> None:
    if manifest.rag is None:  # retrieval.announce_reused_fallbacks has nothing to say
        return
    from services.data_prep.retrieval import announce_reused_fallbacks

    announce_reused_fallbacks(manifest, synapse)


def plan_version(config: DataPrepConfig, store: ArtifactStore, base_dir: str | Path | None = None,
                 synapse: SynapseLink | None = None) -> str:
    """The version id prepare_dataset would produce for this config and the inputs as they are now
    (with a `rag` section: with the retriever discovered now, and no fallback during packing)."""
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    _, inputs = hash_inputs(discover_files(config.corpus, base))
    tok_model, *_ = _resolve_tokenizer(config, store, base)
    choice = _choose_retriever(config, synapse)
    return dataset_version(config, inputs.digest, sha256_bytes(tok_model) if tok_model else None,
                           choice.identity() if choice else None)


def _verified_dataset(path: Path) -> tuple[Manifest | None, str]:
    """(manifest, 'reused (verified N shards by SHA-256)') when every file of the dataset
    directory matches its size and SHA-256 in the manifest, else (None, what failed)."""
    try:
        manifest = load_manifest(path / MANIFEST_NAME)
    except ManifestError:
        return None, "its manifest is missing or unreadable"
    for shard in manifest.shards:
        try:
            check_shard(path, shard, full=False)
        except ShardCorruptError:
            return None, f"shard {shard.path} is missing or has the wrong size"
        try:
            check_shard(path, shard, full=True)
        except ShardCorruptError:
            return None, f"shard {shard.path} failed its digest"
    others = [("tokenizer", manifest.tokenizer.path, manifest.tokenizer.sha256),
              ("histograms", manifest.histograms.path, manifest.histograms.sha256)]
    if manifest.dedup_report is not None:
        others.append(("dedup report", manifest.dedup_report.path, manifest.dedup_report.sha256))
    if manifest.rag is not None:
        idx = manifest.rag.index
        others.append(("retrieval report", manifest.rag.report.path, manifest.rag.report.sha256))
        others += [("retrieval index", f"{idx.path}/{name}", digest) for name, digest in idx.files.items()]
    for name, rel, digest in others:
        p = path / rel
        if not p.is_file() or sha256_file(p) != digest:
            return None, f"{name} {rel} failed its digest"
    return manifest, f"reused (verified {len(manifest.shards)} shards by SHA-256)"


def prepare_dataset(
    config: DataPrepConfig,
    store: ArtifactStore,
    progress: ProgressFn | None = None,
    *,
    base_dir: str | Path | None = None,
    synapse: SynapseLink | None = None,
) -> PrepareResult:
    """Build (or reuse) the dataset the config describes in ``<store>/datasets/<version>/``.

    Relative corpus paths resolve against base_dir (default: the working directory). Raises a
    CorpusError subclass (EmptyCorpusError, PathOutsideRootsError, SourceNotFoundError,
    CorpusFormatError, ParentDatasetError, ...), TokenizerError or SemanticDedupError, each
    naming what to fix. Worker processes are started by a forkserver (they import the main module:
    services.data_prep.pipeline._pool_context): a script calling this needs the
    ``if __name__ == "__main__":`` guard.

    With a `rag` section, `synapse` is how the retrieval stage reaches Cyrex (None: the local
    index serves; rag.retriever 'cyrex' then raises RetrieverUnavailableError).
    """
    report_progress = progress or (lambda stage, fraction: None)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        now = time.perf_counter()
        timings[name] = now - t0
        return now

    t = time.perf_counter()
    outside: list[str] = []
    files = discover_files(config.corpus, base, outside=outside)
    if outside:
        log.warning(f"{len(outside)} corpus files resolve outside the corpus roots (symlinks); skipped",
                    examples=outside[:10])
    t = lap("discover", t)
    workers = config.sharding.workers or os.cpu_count() or 1
    if sum(os.path.getsize(f.path) for f in files) < _MIN_PARALLEL_BYTES:
        workers = 1
    pool_start = _PoolStart(workers)
    try:
        return _prepare(config, store, report_progress, base, synapse, files, outside, pool_start, timings, t_start)
    finally:
        pool_start.close()


def _prepare(
    config: DataPrepConfig,
    store: ArtifactStore,
    report_progress: ProgressFn,
    base: Path,
    synapse: SynapseLink | None,
    files: list[SourceFile],
    outside: list[str],
    pool_start: _PoolStart,
    timings: dict[str, float],
    t_start: float,
) -> PrepareResult:
    """prepare_dataset after discovery; pool_start is started only once a build is certain."""

    def lap(name: str, t0: float) -> float:
        now = time.perf_counter()
        timings[name] = now - t0
        return now

    t = time.perf_counter()
    file_digests, inputs = hash_inputs(files)
    t = lap("hash_inputs", t)
    tok_model, tok_source, parent_version, tok_type = _resolve_tokenizer(config, store, base)
    choice = _choose_retriever(config, synapse)
    version = dataset_version(config, inputs.digest, sha256_bytes(tok_model) if tok_model else None,
                              choice.identity() if choice else None)
    final = store.path("datasets", version)
    status = "built"
    if final.exists():
        existing, note = _verified_dataset(final)
        t = lap("verify_existing", t)
        if existing is not None:
            report_progress("manifest", 1.0)
            log.info(f"dataset {version} {note}", version=version)
            _announce_reused_fallbacks(existing, synapse)  # packed after a fallback: said again, not silent
            timings["total"] = time.perf_counter() - t_start
            return PrepareResult(existing, final / MANIFEST_NAME, True, existing.stages, note, timings)
        status = f"rebuilt: {note}"
        log.warning(f"dataset {version} {status}", version=version)
        trash = final.with_name(f".broken-{version}-{uuid.uuid4().hex[:8]}")
        final.rename(trash)  # incomplete or corrupt leftovers: rebuilt below
        shutil.rmtree(trash, ignore_errors=True)

    # The workers start now, in the background: this process runs the first ingest tasks itself
    # meanwhile (_PoolStart.imap). Not earlier, while hashing: a reused dataset then took ~0.2 s
    # more (the workers' start slowed its hashing and verification down); a build gained nothing
    # measurable.
    pool_start.start()
    workers = pool_start.workers
    tmp = store.path("datasets", f".tmp-{version}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        manifest, reports, manifest_s = _build(
            config, files, file_digests, inputs, version, tok_model, tok_source, tok_type, parent_version,
            tmp, pool_start, report_progress, workers, outside_roots=outside, rag_choice=choice, synapse=synapse,
        )
        timings["pool_start"] = pool_start.waited_s  # what was left of the workers' start when they were needed
        pool_start.close()
        if manifest.version != version:  # a RAG fallback mid-run: a dataset of its own version
            final = store.path("datasets", manifest.version)
        t = time.perf_counter()
        write_manifest(manifest, tmp / MANIFEST_NAME)
        fsync_dir(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process renamed the same version into place first: theirs is identical.
            existing, note = _verified_dataset(final)
            if existing is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            _announce_reused_fallbacks(existing, synapse)
            timings["total"] = time.perf_counter() - t_start
            return PrepareResult(existing, final / MANIFEST_NAME, True, existing.stages, note, timings)
        fsync_dir(final.parent)
        timings["manifest"] = manifest_s + time.perf_counter() - t
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report_progress("manifest", 1.0)
    if status != "built":
        log.info(f"dataset {version} {status}", version=version)
    timings["total"] = time.perf_counter() - t_start
    return PrepareResult(load_manifest(final / MANIFEST_NAME), final / MANIFEST_NAME, False, reports, status, timings)


def _dedup_record(
    stage: str, removed: Document, kept: Document, measure: str, similarity: float, via: Document | None = None
) -> dict[str, Any]:
    """One line of the dedup report (see shared.data.manifest.DedupReportInfo)."""
    record: dict[str, Any] = {
        "stage": stage, "removed": removed.origin, "duplicate_of": kept.origin, "measure": measure,
        "similarity": float(similarity), "domain": removed.domain, "removed_sha256": removed.digest.hex(),
    }
    if via is not None and via is not kept:
        record["via"] = via.origin
    return record


def _check_splits(docs: list[Document], sharding: ShardingConfig) -> None:
    """Fail here, naming the setting, when val_fraction leaves a split without a document:
    the trainer reads both (an explicit val_fraction of 0 means no validation and passes)."""
    fraction, seed, n = sharding.val_fraction, sharding.seed, len(docs)
    if fraction <= 0:
        return
    n_val = sum(is_validation(d.digest, seed, fraction) for d in docs)
    if 0 < n_val < n:
        return
    scores = sorted(validation_score(d.digest, seed) for d in docs)
    setting = f"sharding.val_fraction (data.sharding.val_fraction in a run config) = {fraction}"
    if n_val == 0:
        needed = (math.floor(scores[0] * 1e4) + 1) / 1e4
        raise EmptySplitError(
            f"{setting} sends 0 of {n} documents to validation ({fraction * n:.2f} expected; documents are "
            f"split by a hash of their content): the trainer needs validation tokens. Raise it to at least "
            f"{needed:.4f}, the smallest value that gives this corpus a validation document, add documents, "
            "or set it to 0 to prepare a dataset without validation"
        )
    below = math.floor(scores[-1] * 1e4) / 1e4
    raise EmptySplitError(
        f"{setting} sends every one of the {n} documents to validation and none to training: lower it to "
        f"{below:.4f} or less, or add documents"
    )


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
    pool_start: _PoolStart,
    report_progress: ProgressFn,
    workers: int,
    *,
    outside_roots: list[str],
    rag_choice: RetrieverChoice | None = None,
    synapse: SynapseLink | None = None,
) -> tuple[Manifest, list[StageReport], float]:
    """The stages, written into `out`: (manifest, stage reports, seconds spent on the manifest's files)."""
    reports: list[StageReport] = []
    removed_records: list[dict[str, Any]] = []
    _nbytes = _ByteCounter()

    # 1. ingest and normalise
    t0 = time.perf_counter()
    report_progress("ingest", 0.0)
    chunks = _chunked(files, [os.path.getsize(f.path) for f in files])
    mh = config.minhash
    sign = (mh.ngram, mh.num_perm, mh.seed) if mh.enabled else None  # near dedup's signatures, made here
    results: list[FileResult] = []
    reasons: list[str | None] = []  # the filter's verdict on each document, made in the workers
    sig_parts: list[np.ndarray] = []
    tasks = [(c, config.filters, sign) for c in chunks]
    for n, (part, part_reasons, sigs) in enumerate(pool_start.imap(ingest_task, tasks), start=1):
        results.extend(part)
        reasons.extend(part_reasons)
        if sigs is not None:
            sig_parts.append(sigs)
        report_progress("ingest", n / len(chunks))
    for res, digest in zip(results, file_digests, strict=True):
        if res.sha256 != digest:
            raise CorpusChangedError(f"{res.file.path} changed while data prep was reading it: run it again")
    docs = [doc for res in results for doc in res.docs]
    binary = [f"{r.file.source}:{r.file.relpath}" for r in results if r.binary]
    non_utf8 = [f"{r.file.source}:{r.file.relpath}" for r in results if r.replaced_chars]
    unparseable = sum(r.unparseable for r in results)
    # Ingest removes no document: documents in = out = what the files yielded (a JSONL file one per record).
    ingest = StageReport(
        stage="ingest", docs_in=len(docs), docs_out=len(docs), files_in=len(files),
        files_skipped=sum(1 for r in results if not r.docs), bytes_in=inputs.bytes, bytes_out=_nbytes(docs),
        seconds=time.perf_counter() - t0,
        details={
            "files": len(files),
            "outside_roots_skipped": len(outside_roots),
            "outside_roots_files": outside_roots[:100],
            "binary_skipped": len(binary),
            "binary_files": binary[:100],
            "non_utf8_files": len(non_utf8),
            "non_utf8_examples": non_utf8[:100],
            "replaced_chars": sum(r.replaced_chars for r in results),
            "unparseable_python": unparseable,
        },
    )
    reports.append(ingest)
    if not docs:
        raise EmptyCorpusError(
            f"the corpus has no document: {len(files)} files found, {len(binary)} binary, "
            f"{unparseable} unparseable; check corpus.sources"
        )

    # filters
    t0 = time.perf_counter()
    kept = [doc for doc, reason in zip(docs, reasons, strict=True) if reason is None]  # filters.quality_filter
    removed = Counter(reason for reason in reasons if reason is not None)
    signatures = np.concatenate(sig_parts) if sign is not None else None  # a row per kept document
    sig_row = {id(doc): k for k, doc in enumerate(kept)}
    reports.append(_report("filter", docs, kept, t0, _nbytes, **{k: removed.get(k, 0) for k in sorted(removed)}))
    _require_docs(kept, reports[-1], "relax the filters.* settings")
    report_progress("filter", 1.0)
    docs = kept

    # 2. exact dedup
    t0 = time.perf_counter()
    report_progress("exact_dedup", 0.0)
    kept, duplicates = exact_dedup(docs)
    removed_records += [_dedup_record("exact_dedup", docs[i], docs[first], "sha256", 1.0) for i, first in duplicates]
    reports.append(_report("exact_dedup", docs, kept, t0, _nbytes))
    report_progress("exact_dedup", 1.0)
    docs = kept

    # 3. near dedup
    if signatures is not None:
        t0 = time.perf_counter()
        report_progress("near_dedup", 0.0)
        texts = [d.text for d in docs]
        sigs = signatures[[sig_row[id(d)] for d in docs]]
        near = lsh_near_duplicates(sigs, mh.threshold, texts, mh.ngram)
        kept = [d for d, k in zip(docs, near.keep, strict=True) if k]
        for j, root in sorted(near.duplicate_of.items()):
            via = near.linked_via.get(j)
            removed_records.append(_dedup_record(
                "near_dedup", docs[j], docs[root], "jaccard", near.similarity_to_kept[j],
                docs[via] if via is not None else None,
            ))
        reports.append(_report(
            "near_dedup", docs, kept, t0, _nbytes, bands=near.bands, rows=near.rows,
            candidate_pairs=near.candidate_pairs, verified_pairs=near.verified_pairs, clusters=near.clusters,
            verification="exact", estimate_disagreed=near.estimate_disagreed,
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
        for j, (root, matched) in sorted(result.duplicate_of().items()):
            removed_records.append(_dedup_record(
                "semantic_dedup", docs[j], docs[root], "cosine", float(emb[j] @ emb[root]), docs[matched],
            ))
        reports.append(_report("semantic_dedup", docs, kept, t0, _nbytes, clusters=result.clusters, pairs=len(result.pairs)))
        report_progress("semantic_dedup", 1.0)
        docs = kept

    # Both splits must get documents: fail now, not after tokenizing (or in the trainer).
    _check_splits(docs, config.sharding)

    # 5. tokenizer
    t0 = time.perf_counter()
    report_progress("tokenizer", 0.0)
    trained = tok_model is None
    boundary = RAG_BOUNDARY_TOKENS if config.rag is not None else ()
    if trained:
        tok_model = train_tokenizer([d.text for d in docs], config.tokenizer, boundary)
    sp = load_tokenizer(tok_model)
    user_defined_ids(sp, boundary)  # a reused tokenizer without the boundary pieces fails here
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
        imap=pool_start.get().imap, progress=lambda f: report_progress("tokenize", f),
    )
    tokenize_s = time.perf_counter() - t0
    shards = sharded.shards
    rag_info = None
    if config.rag is not None:
        from services.data_prep.retrieval import fallback_digest, retrieval_stage

        assert rag_choice is not None
        t_rag = time.perf_counter()
        report_progress("retrieval", 0.0)
        outcome = retrieval_stage(docs, removed_records, sharded.shards, out, sp, dtype, sh, config.rag, rag_choice,
                                  synapse, lambda f: report_progress("retrieval", f))
        shards, rag_info = outcome.shards, outcome.info
        if any(f.from_retriever is not None for f in rag_info.fallbacks):
            version = dataset_version(config, inputs.digest, tokenizer.sha256 if not trained else None,
                                      {**rag_choice.identity(), "packed": fallback_digest(shards)})
        rag_report = StageReport(
            stage="retrieval", docs_in=len(docs), docs_out=len(docs), bytes_in=_nbytes(docs),
            bytes_out=sum(s.size_bytes for s in shards), seconds=time.perf_counter() - t_rag, details=outcome.details,
        )
    t_manifest = time.perf_counter()
    hist_bytes = histogram_file_bytes(sharded.histograms, {"dataset_version": version, "vocab_size": str(vocab)})
    atomic_write_bytes(out / HISTOGRAM_FILE, hist_bytes)
    report_bytes = b"".join(json.dumps(r).encode() + b"\n" for r in removed_records)
    atomic_write_bytes(out / DEDUP_REPORT_FILE, report_bytes)
    by_stage: dict[str, int] = {}
    for r in removed_records:
        by_stage[r["stage"]] = by_stage.get(r["stage"], 0) + 1
    reports.append(StageReport(
        stage="tokenize", docs_in=len(docs), docs_out=len(docs), bytes_in=_nbytes(docs),
        bytes_out=sum(s.size_bytes for s in sharded.shards), seconds=tokenize_s,
        details={
            "tokens": sum(s.tokens for s in sharded.shards),
            "shards": len(sharded.shards),
            "workers": workers,
        },
    ))
    if rag_info is not None:
        reports.append(rag_report)

    report_progress("manifest", 0.0)
    manifest = Manifest(
        schema_version=PACKED_SCHEMA_VERSION if rag_info is not None else 1,
        version=version,
        parent_version=parent_version,
        pipeline_version=PIPELINE_VERSION,
        config=config.model_dump(mode="json"),
        inputs=inputs,
        dtype=dtype,
        tokenizer=tokenizer,
        shards=shards,
        domains=sharded.domains,
        stages=reports,
        histograms=HistogramInfo(
            path=HISTOGRAM_FILE, sha256=sha256_bytes(hist_bytes), size_bytes=len(hist_bytes),
            keys=list(sharded.histograms),
        ),
        dedup_report=DedupReportInfo(
            path=DEDUP_REPORT_FILE, sha256=sha256_bytes(report_bytes), size_bytes=len(report_bytes), records=by_stage,
        ),
        rag=rag_info,
    )
    return manifest, reports, time.perf_counter() - t_manifest


