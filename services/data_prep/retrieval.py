"""The retrieval stage of data prep: every training window gets retrieved context, packed.

After the tokenize stage has written the flat shards, for each split and domain:

1. the stream is cut into base windows (shared.retrieval.packing.base_windows); each
   window's query is the first rag.query_chars characters of its decoded text;
2. the retriever chosen at discovery (`choose_retriever`: Cyrex over Synapse, or the local
   BM25 index built here from the training documents) answers the queries in batches; what
   Cyrex cannot answer (timeout, a dead instance, malformed results) the local index answers,
   and every such fallback is published (RetrievalFallback) and recorded in the manifest;
3. the leakage rule drops, after retrieval whatever the retriever claims, every chunk of the
   window's own documents, of their duplicate clusters (the dedup stages' removed -> kept
   links, transitively) and of any validation document (validation windows retrieve from
   training data only, and training never sees validation text), and every chunk whose text
   is a substring of the window's own text or of one of its documents (a retriever that
   indexed the same text under other ids);
4. the windows are packed into records with their kinds (packing.pack_record) and written
   as the packed shards, replacing the flat ones; `retrieval_report.jsonl` says, per window
   (`<split>/<domain>/<n>`, n its record in that stream), its source documents, the retriever
   that served it and the chunks packed (chunk_id, source_id).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
import sentencepiece as spm

from contracts import RetrievalFallback, RetrievalQuery, RetrievedChunk, RetrieverHeartbeat
from services.data_prep.ingest import Document
from services.data_prep.sharding import is_validation
from services.data_prep.tokenizer import EOS_ID, PAD_ID, user_defined_ids
from shared.artifacts import atomic_write_bytes, sha256_bytes
from shared.data.config import RAG_BOUNDARY_TOKENS, RagConfig
from shared.data.manifest import RagInfo, RetrievalFallbackInfo, RetrievalIndexInfo, RetrievalReportInfo, ShardInfo
from shared.logging import get_logger
from shared.retrieval import (
    Chunk,
    LocalIndex,
    RetrieverUnavailableError,
    SynapseLink,
    SynapseRetriever,
    find_retriever,
)
from shared.retrieval.packing import KIND_NAMES, Layout, PackedShardWriter, base_windows, pack_record

log = get_logger("helox.data_prep.retrieval")

INDEX_DIR = "rag_index"
REPORT_FILE = "retrieval_report.jsonl"
LOCAL = LocalIndex.NAME
MIN_SUBSTRING_CHARS = 32
"""Chunks at least this long (or as long as a shorter window's text, 8 at least) are also checked as
substrings of the window's own text and documents: shorter ones are common phrases, not leaks."""

ProgressFn = Callable[[float], None]
AnyChunk = RetrievedChunk | Chunk
"""What packing reads of a chunk (chunk_id, source_id, text): Cyrex's (the contract's) or the local index's."""


@dataclass
class RetrieverChoice:
    """Which retriever serves the packing, decided before the dataset version is."""

    name: str  # LOCAL or "cyrex:<instance>"
    heartbeat: RetrieverHeartbeat | None = None
    fallback: RetrievalFallbackInfo | None = None  # auto without a live Cyrex

    def identity(self) -> dict[str, Any]:
        """What the dataset version depends on: the retriever and its index."""
        if self.heartbeat is None:  # the local index: a function of the inputs, the settings and bm25s
            return {"retriever": LOCAL, "bm25s": bm25s.__version__}
        return {"retriever": self.heartbeat.name, "index_digest": self.heartbeat.index_digest}


def choose_retriever(rag: RagConfig, link: SynapseLink | None) -> RetrieverChoice:
    """rag.retriever applied: local; cyrex (RetrieverUnavailableError without one); auto."""
    if rag.retriever == "local":
        return RetrieverChoice(LOCAL)
    if link is None:
        if rag.retriever == "cyrex":
            raise RetrieverUnavailableError(
                "data.rag.retriever is 'cyrex' but this data prep has no Synapse connection (offline prepare?): "
                "run it through the data-prep service, or set data.rag.retriever to auto or local"
            )
        reason = "no Synapse connection (offline data prep): the local index serves"
        log.warning(f"RAG packing: {reason}")
        return RetrieverChoice(LOCAL, fallback=RetrievalFallbackInfo(from_retriever=None, to_retriever=LOCAL,
                                                                     reason=reason, queries=0))
    found = find_retriever(link, rag.discovery_timeout_s, rag.indexing_wait_s)
    hb = found.retriever
    if hb is not None:
        log.info("RAG packing: retriever discovered", retriever=hb.name, instance=hb.instance,
                 index_digest=hb.index_digest, waited_s=round(found.waited_s, 2))
        return RetrieverChoice(f"{hb.name}:{hb.instance}", heartbeat=hb)
    reason = found.reason(link.stream(RetrieverHeartbeat), rag.discovery_timeout_s, rag.indexing_wait_s)
    if rag.retriever == "cyrex":
        setting = "raise data.rag.indexing_wait_s" if found.indexing is not None else "start Cyrex, raise the timeout"
        raise RetrieverUnavailableError(
            f"data.rag.retriever is 'cyrex' and {reason}: {setting}, or set data.rag.retriever to auto or local"
        )
    log.warning(f"RAG packing falls back to the local index: {reason}")
    # from_retriever None: nothing served yet (the reason names an instance that was still indexing), so
    # the packing is the local index's alone and keeps its version (mid-run fallbacks get their own).
    return RetrieverChoice(LOCAL, fallback=RetrievalFallbackInfo(from_retriever=None, to_retriever=LOCAL,
                                                                 reason=reason, queries=0))


def duplicate_clusters(removed_records: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Origin -> every other origin of its duplicate cluster (dedup's removed/duplicate_of/via links)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for r in removed_records:
        for other in (r["duplicate_of"], r.get("via")):
            if other:
                parent[find(r["removed"])] = find(other)
    members: dict[str, set[str]] = {}
    for x in list(parent):
        members.setdefault(find(x), set()).add(x)
    return {x: members[find(x)] - {x} for x in parent}


@dataclass
class _Stream:
    split: str
    domain: str
    tokens: np.ndarray
    docs: list[Document]
    doc_ends: np.ndarray


@dataclass
class _Window:
    stream: _Stream
    start: int
    end: int
    sources: list[Document]
    query_id: str
    text: str  # the base text, decoded (documents joined without their EOS)
    exclude: set[str] = field(default_factory=set)
    chunks: list[RetrievedChunk] = field(default_factory=list)
    served_by: str = LOCAL

    @property
    def min_substring(self) -> int:
        """Chunks this long or longer are checked as substrings (a short window: its whole text)."""
        return max(8, min(MIN_SUBSTRING_CHARS, len(self.text.strip())))


@dataclass
class RetrievalOutcome:
    shards: list[ShardInfo]
    info: RagInfo
    details: dict[str, Any]


def _streams(docs: list[Document], flat: list[ShardInfo], root: Path, val_fraction: float, seed: int,
             dtype: str) -> list[_Stream]:
    out = []
    for split, domain in sorted({(s.split, s.domain) for s in flat}):
        parts = [np.fromfile(root / s.path, dtype=dtype) for s in flat if s.split == split and s.domain == domain]
        tokens = np.concatenate(parts).astype(np.int64)
        mine = [d for d in docs if d.domain == domain and (split == "val") == is_validation(d.digest, seed, val_fraction)]
        ends = np.flatnonzero(tokens == EOS_ID) + 1
        if len(ends) != len(mine):
            raise RuntimeError(f"{split}/{domain}: {len(ends)} EOS in the stream for {len(mine)} documents")
        out.append(_Stream(split, domain, tokens, mine, ends))
    return out


class _Publisher:
    """Fallbacks: recorded for the manifest, logged as warnings and, with a bus, published."""

    def __init__(self, link: SynapseLink | None, what: str = "RAG packing fell back") -> None:
        self.link = link
        self.what = what
        self.records: list[RetrievalFallbackInfo] = []

    def __call__(self, info: RetrievalFallbackInfo) -> None:
        self.records.append(info)
        log.warning(f"{self.what} to {info.to_retriever} for {info.queries} queries: {info.reason}",
                    from_retriever=info.from_retriever, split=info.split)
        if self.link is not None:
            self.link.publish(RetrievalFallback(stage="data", from_retriever=info.from_retriever,
                                                to_retriever=info.to_retriever, reason=info.reason,
                                                queries=info.queries))


def retrieval_stage(
    docs: list[Document],
    removed_records: list[dict[str, Any]],
    flat: list[ShardInfo],
    out: Path,
    sp: spm.SentencePieceProcessor,
    dtype: str,
    sharding: Any,
    rag: RagConfig,
    choice: RetrieverChoice,
    link: SynapseLink | None,
    progress: ProgressFn,
) -> RetrievalOutcome:
    """Retrieve for every window, pack, and replace the flat shards under `out` by packed ones."""
    ids = user_defined_ids(sp, RAG_BOUNDARY_TOKENS)
    layout = Layout.of(rag.seq_len, rag.context_budget, ids, PAD_ID)
    streams = _streams(docs, flat, out, sharding.val_fraction, sharding.seed, dtype)
    for shard in flat:  # read into memory: the flat shards give way to the packed ones (same names)
        (out / shard.path).unlink()

    # The local index: training documents only (validation windows retrieve from training data).
    train_docs = [d for s in streams if s.split == "train" for d in s.docs]
    index = LocalIndex.build(((d.origin, d.text) for d in train_docs), rag.chunk_tokens,
                             lambda lines: [len(x) for x in sp.encode(lines, num_threads=1)])
    digest, files, size = index.save(out / INDEX_DIR)
    progress(0.1)

    clusters = duplicate_clusters(removed_records)
    val_origins = {d.origin for s in streams if s.split == "val" for d in s.docs}
    val_closed = val_origins | {o for v in val_origins for o in clusters.get(v, ())}

    windows: list[_Window] = []
    queries: list[RetrievalQuery] = []
    k_ask = min(2 * rag.k, 256)
    for s in streams:
        spans = base_windows(s.doc_ends, len(s.tokens), layout.base_tokens)
        texts = sp.decode([s.tokens[a:b][s.tokens[a:b] != EOS_ID].tolist() for a, b, _, _ in spans])
        for i, ((a, b, first, last), text) in enumerate(zip(spans, texts, strict=True)):
            sources = s.docs[first : last + 1]
            own = {d.origin for d in sources}
            exclude = own | {o for d in sources for o in clusters.get(d.origin, ())}
            w = _Window(s, a, b, sources, f"{s.split}/{s.domain}/{i}", text, exclude)
            windows.append(w)
            queries.append(RetrievalQuery(query_id=w.query_id, text=text[: rag.query_chars], k=k_ask,
                                          exclude_source_ids=sorted(exclude)))

    fallback = _Publisher(link)
    if choice.fallback is not None:
        fallback(choice.fallback.model_copy(update={"queries": len(queries)}))
    answered = _retrieve(windows, queries, index, choice, link, rag, fallback, lambda f: progress(0.1 + 0.6 * f))

    # Leakage rule, after retrieval, whoever retrieved; then pack.
    rejected = 0
    kept_of: list[list[AnyChunk]] = []
    for w in windows:
        kept: list[AnyChunk] = []
        for c in answered.get(w.query_id, []):
            text = c.text.strip()
            # Chunks of our own index carry our ids, which the first two tests judge exactly; another
            # retriever's ids may name the same text otherwise, so its chunks are compared as text too.
            leak = c.source_id in w.exclude or c.source_id in val_closed or (
                w.served_by != LOCAL and len(text) >= w.min_substring
                and (text in w.text or any(text in d.text for d in w.sources)))
            if leak:
                rejected += 1
            elif len(kept) < rag.k:
                kept.append(c)
        kept_of.append(kept)
    # Every distinct chunk encoded once, in one call (per-window calls cost more than the encoding).
    distinct = {(c.chunk_id, c.text): None for kept in kept_of for c in kept}
    chunk_ids = dict(zip(distinct, sp.encode([t for _, t in distinct], num_threads=1), strict=True))
    progress(0.8)

    served: dict[str, int] = {}
    writers: dict[tuple[str, str], PackedShardWriter] = {}
    counts = {"train": 0, "val": 0}
    report: list[bytes] = []
    for n, (w, kept) in enumerate(zip(windows, kept_of, strict=True)):
        tokens, kinds, used = pack_record(layout, w.stream.tokens[w.start : w.end], [chunk_ids[c.chunk_id, c.text] for c in kept])
        served[w.served_by] = served.get(w.served_by, 0) + used
        report.append(json.dumps({
            "window": w.query_id, "sources": [d.origin for d in w.sources], "retriever": w.served_by,
            "chunks": [{"chunk_id": c.chunk_id, "source_id": c.source_id} for c in kept[:used]],
        }, ensure_ascii=False).encode() + b"\n")
        key = (w.stream.split, w.stream.domain)
        if key not in writers:
            writers[key] = PackedShardWriter(out, *key, dtype, sharding.shard_tokens)
        writers[key].add(tokens, kinds)
        counts[w.stream.split] += 1
        if n % 1024 == 0:
            progress(0.8 + 0.2 * n / len(windows))
    shards = [sh for key in sorted(writers) for sh in writers[key].finish()]
    report_bytes = b"".join(report)
    atomic_write_bytes(out / REPORT_FILE, report_bytes)
    kind_totals = sum((wr.kind_counts for wr in writers.values()), np.zeros(3, dtype=np.int64))
    by_retriever: dict[str, int] = {}
    for w in windows:
        by_retriever[w.served_by] = by_retriever.get(w.served_by, 0) + 1
    info = RagInfo(
        seq_len=rag.seq_len, record_tokens=layout.record_tokens, context_budget=rag.context_budget,
        context_loss_weight=rag.context_loss_weight, boundary_ids=ids, retriever=choice.name,
        retriever_index_digest=choice.heartbeat.index_digest if choice.heartbeat else digest,
        index=RetrievalIndexInfo(path=INDEX_DIR, sha256=digest, files=files, size_bytes=size, chunks=len(index.chunks),
                                 documents=index.documents, chunk_tokens=rag.chunk_tokens),
        windows=counts, queries_by_retriever=by_retriever, chunks_by_retriever=served,
        fallbacks=fallback.records, leakage_rejected=rejected,
        report=RetrievalReportInfo(path=REPORT_FILE, sha256=sha256_bytes(report_bytes), size_bytes=len(report_bytes)),
        tokens={KIND_NAMES[k]: int(v) for k, v in enumerate(kind_totals.tolist())},
    )
    progress(1.0)
    details = {"retriever": choice.name, "windows": counts, "queries_by_retriever": by_retriever,
               "chunks_by_retriever": served, "fallbacks": len(fallback.records), "leakage_rejected": rejected,
               "index_chunks": len(index.chunks), "index_sha256": digest}
    return RetrievalOutcome(shards, info, details)


def _retrieve(windows: list[_Window], queries: list[RetrievalQuery], index: LocalIndex, choice: RetrieverChoice,
              link: SynapseLink | None, rag: RagConfig, fallback: _Publisher,
              progress: ProgressFn) -> dict[str, list[AnyChunk]]:
    """query id -> chunks, from Cyrex while it answers well, else from the local index."""
    by_id = {w.query_id: w for w in windows}
    answered: dict[str, list[AnyChunk]] = {}
    local_todo: list[RetrievalQuery] = []
    batches = [queries[i : i + rag.batch_queries] for i in range(0, len(queries), rag.batch_queries)]
    if choice.heartbeat is not None and link is not None:
        cyrex = SynapseRetriever(link, choice.heartbeat, rag.request_timeout_s)
        step = cyrex.max_in_flight
        for b0 in range(0, len(batches), step):
            group = batches[b0 : b0 + step]
            answers = cyrex.ask(group)
            for queries_of, answer in zip(group, answers, strict=True):
                for q in queries_of:
                    res = answer.results.get(q.query_id)
                    if res is not None:
                        answered[q.query_id] = list(res.chunks)
                        by_id[q.query_id].served_by = cyrex.name
                failed = [q for q in queries_of if q.query_id in answer.failed]
                if failed and not answer.timed_out:
                    reason = answer.failed[failed[0].query_id]
                    fallback(RetrievalFallbackInfo(from_retriever=cyrex.name, to_retriever=LOCAL, reason=reason,
                                                   queries=len(failed), split=failed[0].query_id.split("/")[0]))
                local_todo += failed
            if any(a.timed_out for a in answers):
                # A dead (or hung) Cyrex: its pending requests timed out; the local index answers the rest.
                rest = [q for g in batches[b0 + step :] for q in g]
                lost = [q for g, a in zip(group, answers, strict=True) if a.timed_out for q in g]
                reason = next(a.failed[next(iter(a.failed))] for a in answers if a.timed_out)
                fallback(RetrievalFallbackInfo(from_retriever=cyrex.name, to_retriever=LOCAL,
                                               reason=f"{reason}: the local index answers the rest of the run",
                                               queries=len(lost) + len(rest)))
                local_todo += rest
                break
            progress(min(1.0, (b0 + step) / max(len(batches), 1)))
    else:
        local_todo = list(queries)
    for i in range(0, len(local_todo), rag.batch_queries):
        part = local_todo[i : i + rag.batch_queries]
        for q, hits in zip(part, index.search(part), strict=True):
            answered[q.query_id] = [c for c, _ in hits]
            by_id[q.query_id].served_by = LOCAL
        progress(min(1.0, (i + len(part)) / max(len(local_todo), 1)))
    return answered


def announce_reused_fallbacks(manifest: Any, link: SynapseLink | None) -> list[RetrievalFallbackInfo]:
    """A reused dataset that was packed after fallbacks (manifest `rag.fallbacks`) is no silent
    reuse: each fallback is said again for this run, logged as a warning and, with a bus,
    published as RetrievalFallback (which `helox run` prints as a WARNING line). Returns them."""
    rag = getattr(manifest, "rag", None)
    if rag is None or not rag.fallbacks:
        return []
    publish = _Publisher(link, "RAG packing of a reused dataset fell back")
    for f in rag.fallbacks:
        publish(f.model_copy(update={"reason": f"dataset {manifest.version} reused as packed after a fallback: "
                                               f"{f.reason}"}))
    return publish.records


def fallback_digest(shards: list[ShardInfo]) -> str:
    """Identifies what a degraded packing produced (its shards' digests): part of its dataset version."""
    h = hashlib.sha256()
    for s in shards:
        h.update(f"{s.path}\0{s.sha256}\0{s.mask.sha256 if s.mask else ''}\n".encode())
    return h.hexdigest()
