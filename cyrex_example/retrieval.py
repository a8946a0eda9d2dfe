"""BM25 over a collection's chunks (bm25s), and the answer to a RetrievalRequested.

Pure: no Redis here. The service (`service.py`) feeds requests in and publishes the answers.

Ranking: bm25s' Lucene BM25 (k1 1.5, b 0.75) over lower-cased words of two or more
characters, English stop words removed, no stemming. A query gets every chunk with a positive
score, best first (ties: collection order), at most min(k, max_k), leaving out the chunks of
`exclude_source_ids`: an id names a document (`source_id`), or a whole file (every record of
a JSONL file); an id in the form of Helox data-prep's document origins, `<source index>:<path>`
or `<source index>:<path>:<line>`, also names the document at that path (so a collection
indexed at a corpus source's directory honours Helox's leakage control as it sends it).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

import numpy as np

from contracts import RetrievalCompleted, RetrievalQuery, RetrievalRequested, RetrievalResult, RetrievedChunk

from .collection import Chunk, Collection

RETRIEVER_NAME = "cyrex"
_ORIGIN = re.compile(r"^\d+:(.+)$")  # data-prep's `<source index>:<relpath>[:<line>]`


class Bm25Index:
    """The chunks of one collection, indexed for BM25."""

    def __init__(self, collection: Collection) -> None:
        import bm25s

        self._bm25s = bm25s
        self.collection = collection
        self.chunks: list[Chunk] = collection.chunks
        self.digest = collection.digest
        self._by_source: dict[str, list[int]] = {}
        for i, c in enumerate(self.chunks):
            self._by_source.setdefault(c.source_id, []).append(i)
            if c.file != c.source_id:
                self._by_source.setdefault(c.file, []).append(i)
        self._retriever = None
        if self.chunks:
            tokens = bm25s.tokenize([c.text for c in self.chunks], stopwords="en", show_progress=False)
            self._retriever = bm25s.BM25()
            self._retriever.index(tokens, show_progress=False)

    @property
    def documents(self) -> int:
        return self.collection.documents

    def terms(self, text: str) -> list[str]:
        """The query's searchable words (what BM25 scores)."""
        (terms,) = self._bm25s.tokenize([text], stopwords="en", show_progress=False, return_ids=False)
        return list(terms)

    def _excluded(self, source: str) -> list[int]:
        """Chunks an exclude id names: its document or file, or the one its data-prep origin names."""
        hit = self._by_source.get(source, [])
        origin = _ORIGIN.match(source)
        return hit + self._by_source.get(origin.group(1), []) if origin else hit

    def search(self, text: str, k: int, exclude_source_ids: Sequence[str] = ()) -> list[RetrievedChunk]:
        """The best `k` chunks for `text` with a positive score, best first."""
        terms = self.terms(text)
        if self._retriever is None or not terms or k <= 0:
            return []
        scores = np.asarray(self._retriever.get_scores(terms), dtype=np.float64)
        for source in exclude_source_ids:
            scores[self._excluded(source)] = 0.0
        hits = np.flatnonzero(scores > 0)
        order = hits[np.lexsort((hits, -scores[hits]))][:k]  # score descending, then collection order
        return [RetrievedChunk(chunk_id=self.chunks[i].chunk_id, source_id=self.chunks[i].source_id,
                               text=self.chunks[i].text, score=float(scores[i])) for i in order]


def query_error(query: RetrievalQuery, seen: set[str]) -> str | None:
    """Why a query cannot be answered, or None."""
    if not query.text.strip():
        return "empty query text"
    if query.query_id in seen:
        return f"duplicate query_id {query.query_id!r} in the request"
    return None


def answer(request: RetrievalRequested, index: Bm25Index, *, max_k: int, instance: str) -> RetrievalCompleted:
    """The RetrievalCompleted for a request: one result per query, in the request's order."""
    started = time.perf_counter()
    results = []
    seen: set[str] = set()
    for q in request.queries:
        error = query_error(q, seen)
        seen.add(q.query_id)
        if error:
            results.append(RetrievalResult(query_id=q.query_id, error=error))
            continue
        chunks = index.search(q.text, min(q.k, max_k), q.exclude_source_ids)
        results.append(RetrievalResult(query_id=q.query_id, chunks=chunks))
    return RetrievalCompleted(request_id=request.request_id, retriever=RETRIEVER_NAME, instance=instance,
                              index_digest=index.digest, results=results,
                              elapsed_ms=(time.perf_counter() - started) * 1000)
