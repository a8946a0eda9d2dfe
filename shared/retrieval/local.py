"""The local retriever: BM25 (the `bm25s` package) over chunks of the run's own corpus.

Chunks are runs of whole lines of one document, closed once they hold `chunk_tokens` tokens
(counted by the caller's function: data-prep passes its sentencepiece model; a line longer
than that is a chunk by itself). A chunk's id is ``<source_id>#<n>`` (its position in the
document), its source id the document's id, so ids are stable for the same corpus.

The index is an artifact: a directory with bm25s's own files (the CSC score matrix, the
vocabulary, the parameters) and ``chunks.jsonl`` (one {chunk_id, source_id, text} per line,
in index order). Its digest is the SHA-256 of the lines ``<file>\\0<sha256 of the file>\\n``
of every file, sorted by name (`index_digest`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import bm25s
import numpy as np

from contracts import RetrievalQuery, RetrievalResult, RetrievedChunk

CHUNKS_FILE = "chunks.jsonl"
STOPWORDS = "en"
"""bm25s's English stop words; its default token pattern (words of 2+ word characters, lowercased)."""

CountTokens = Callable[[list[str]], list[int]]


class LocalIndexError(ValueError):
    """A local index cannot be built or loaded; the message names the directory or setting."""


def approx_tokens(lines: list[str]) -> list[int]:
    """Token counts at ~4 characters per token (what a caller without a tokenizer gets)."""
    return [max(1, len(line) // 4) for line in lines]


@dataclass(frozen=True, slots=True)
class Chunk:
    chunk_id: str
    source_id: str
    text: str


def chunk_document(source_id: str, text: str, chunk_tokens: int, line_tokens: list[int]) -> list[Chunk]:
    """One document's chunks: consecutive lines until `chunk_tokens` tokens (counts per line given)."""
    lines = text.split("\n")
    chunks: list[Chunk] = []
    start, total = 0, 0
    for i, n in enumerate(line_tokens):
        total += n
        if total >= chunk_tokens or i == len(lines) - 1:
            body = "\n".join(lines[start : i + 1])
            if body.strip():
                chunks.append(Chunk(f"{source_id}#{len(chunks)}", source_id, body))
            start, total = i + 1, 0
    return chunks


def chunk_documents(
    docs: Iterable[tuple[str, str]], chunk_tokens: int, count_tokens: CountTokens = approx_tokens
) -> list[Chunk]:
    """(source_id, text) pairs into chunks of about chunk_tokens tokens, in document order."""
    if chunk_tokens < 1:
        raise LocalIndexError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    docs = list(docs)
    split = [text.split("\n") for _, text in docs]
    distinct = list(dict.fromkeys(line for lines in split for line in lines))
    counts = dict(zip(distinct, count_tokens(distinct), strict=True))
    out: list[Chunk] = []
    for (source_id, text), lines in zip(docs, split, strict=True):
        out += chunk_document(source_id, text, chunk_tokens, [counts[line] for line in lines])
    return out


def index_digest(directory: Path) -> tuple[str, dict[str, str], int]:
    """(digest, {file: sha256}, bytes) of an index directory (see the module docstring)."""
    files: dict[str, str] = {}
    size = 0
    for p in sorted(directory.iterdir()):
        if p.is_file():
            data = p.read_bytes()
            files[p.name] = hashlib.sha256(data).hexdigest()
            size += len(data)
    h = hashlib.sha256()
    for name, digest in files.items():
        h.update(f"{name}\0{digest}\n".encode())
    return h.hexdigest(), files, size


def tokenize_queries(texts: Sequence[str]) -> list[list[str]]:
    return bm25s.tokenize(list(texts), stopwords=STOPWORDS, return_ids=False, show_progress=False)


class LocalIndex:
    """BM25 over chunks: `search` answers RetrievalQuery batches (`answer`: as the contract's results)."""

    NAME = "local-bm25"

    def __init__(self, chunks: list[Chunk], bm25: bm25s.BM25, digest: str = "") -> None:
        self.chunks = chunks
        self.bm25 = bm25
        self.digest = digest
        self._per_source: dict[str, int] = {}
        self._source_index: dict[str, int] = {}
        for c in chunks:
            self._per_source[c.source_id] = self._per_source.get(c.source_id, 0) + 1
            self._source_index.setdefault(c.source_id, len(self._source_index))
        self._source_of = np.fromiter((self._source_index[c.source_id] for c in chunks), dtype=np.int64,
                                      count=len(chunks))

    @property
    def documents(self) -> int:
        return len(self._per_source)

    @classmethod
    def build(
        cls, docs: Iterable[tuple[str, str]], chunk_tokens: int, count_tokens: CountTokens = approx_tokens
    ) -> LocalIndex:
        """Chunk (source_id, text) documents and index the chunks with BM25."""
        chunks = chunk_documents(docs, chunk_tokens, count_tokens)
        if not chunks:
            raise LocalIndexError("no chunk to index: the documents are empty")
        tokens = bm25s.tokenize([c.text for c in chunks], stopwords=STOPWORDS, show_progress=False)
        bm25 = bm25s.BM25()
        bm25.index(tokens, show_progress=False)
        return cls(chunks, bm25)

    def save(self, directory: str | Path) -> tuple[str, dict[str, str], int]:
        """Write the index into `directory` (created); returns index_digest's (digest, files, bytes)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.bm25.save(str(d), show_progress=False)
        with open(d / CHUNKS_FILE, "wb") as f:
            for c in self.chunks:
                f.write(json.dumps({"chunk_id": c.chunk_id, "source_id": c.source_id, "text": c.text},
                                   ensure_ascii=False).encode() + b"\n")
        self.digest, files, size = index_digest(d)
        return self.digest, files, size

    @classmethod
    def load(cls, directory: str | Path, expected_digest: str | None = None) -> LocalIndex:
        """Load an index saved by `save`; refuses one whose digest is not `expected_digest`."""
        d = Path(directory)
        if not (d / CHUNKS_FILE).is_file():
            raise LocalIndexError(f"no local retrieval index at {d} ({CHUNKS_FILE} missing): re-run data prep")
        digest, _, _ = index_digest(d)
        if expected_digest is not None and digest != expected_digest:
            raise LocalIndexError(f"retrieval index {d} has digest {digest}, the manifest says {expected_digest}: "
                              "the index is corrupt; re-run data prep")
        chunks = []
        with open(d / CHUNKS_FILE, "rb") as f:
            for line in f:
                rec = json.loads(line)
                chunks.append(Chunk(rec["chunk_id"], rec["source_id"], rec["text"]))
        return cls(chunks, bm25s.BM25.load(str(d)), digest)

    def answer(self, queries: Sequence[RetrievalQuery]) -> list[RetrievalResult]:
        """`search` as the contract's results (what a retriever on Synapse sends)."""
        return [
            RetrievalResult.model_construct(query_id=q.query_id, error=None, chunks=[
                RetrievedChunk.model_construct(chunk_id=c.chunk_id, source_id=c.source_id, text=c.text, score=s)
                for c, s in hits])
            for q, hits in zip(queries, self.search(queries), strict=True)
        ]

    def search(self, queries: Sequence[RetrievalQuery]) -> list[list[tuple[Chunk, float]]]:
        """(chunk, score) of the top-k chunks per query, best first: positive scores only, none of an
        excluded source."""
        if not queries:
            return []
        # Ask for enough that, after dropping every chunk of the excluded sources, k remain.
        extra = max(sum(self._per_source.get(s, 0) for s in q.exclude_source_ids) for q in queries)
        depth = min(max(q.k for q in queries) + extra, len(self.chunks))
        ids, scores = self.bm25.retrieve(tokenize_queries([q.text for q in queries]), k=depth,
                                         show_progress=False, n_threads=1)
        return [self._result(q, row, srow) for q, row, srow in zip(queries, ids, scores, strict=True)]

    def _result(self, q: RetrievalQuery, row: np.ndarray, scores: np.ndarray) -> list[tuple[Chunk, float]]:
        keep = scores > 0
        excluded = [self._source_index[s] for s in q.exclude_source_ids if s in self._source_index]
        if excluded:
            keep &= ~np.isin(self._source_of[row], excluded)
        chunks = self.chunks
        return [(chunks[i], s) for i, s in zip(row[keep][: q.k].tolist(), scores[keep][: q.k].tolist(), strict=True)]
