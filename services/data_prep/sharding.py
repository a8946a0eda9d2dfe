"""Tokenize documents in worker processes and write flat, memory-mappable token shards.

A shard is a raw little-endian array of token ids (uint16 when the vocabulary fits, else
uint32) holding whole documents, each followed by EOS: ``np.memmap(path, dtype)`` reads it.
A document goes to validation when a salted hash of its content falls below val_fraction,
so the split does not depend on document order or worker count. Shards are kept per split
and domain (``train/<domain>/shard_00000.bin``) and closed after the document that
crosses shard_tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.data_prep.ingest import Document
from services.data_prep.tokenizer import EOS_ID, DocumentEncoder, load_tokenizer
from shared.data.manifest import DomainStats, ShardInfo

_CHUNK_BYTES = 1 << 19  # text per worker task: amortises pickling, small enough to balance 2+ workers

_ENCODERS: dict[str, DocumentEncoder] = {}  # per worker process: model file digest -> encoder


def _split_hash(digest: bytes, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(seed.to_bytes(8, "little") + digest).digest()[:8], "little")


def is_validation(digest: bytes, seed: int, val_fraction: float) -> bool:
    """Deterministic split of a document by its content digest."""
    if val_fraction <= 0:
        return False
    return _split_hash(digest, seed) < val_fraction * 2.0**64


def validation_score(digest: bytes, seed: int) -> float:
    """The document's split hash in [0, 1): it goes to validation when val_fraction is above this."""
    return _split_hash(digest, seed) / 2.0**64


@dataclass
class EncodedChunk:
    """Tokens of a chunk of documents, EOS after each, with per-document lengths and splits."""

    tokens: np.ndarray
    lengths: np.ndarray  # tokens per document, EOS included
    is_val: np.ndarray  # bool per document
    histograms: dict[tuple[bool, int], np.ndarray]  # (is_val, domain index) -> counts


def encode_task(args: tuple[str, str, list[str], list[bytes], list[int], int, float, str, int]) -> EncodedChunk:
    """Pool task: tokenize one chunk of documents (each worker loads the model file once)."""
    model_path, model_digest, texts, digests, domains, seed, val_fraction, dtype, vocab = args
    encoder = _ENCODERS.get(model_digest)
    if encoder is None:
        encoder = _ENCODERS[model_digest] = DocumentEncoder(load_tokenizer(model_path))
    flat, doc_lengths = encoder.encode_flat(texts, EOS_ID)
    tokens = np.array(flat, dtype=dtype)
    lengths = np.array(doc_lengths, dtype=np.int64)
    is_val = np.array([is_validation(d, seed, val_fraction) for d in digests], dtype=bool)
    histograms: dict[tuple[bool, int], np.ndarray] = {}
    ends = np.cumsum(lengths)
    starts = ends - lengths
    for key in {(bool(v), d) for v, d in zip(is_val, domains, strict=True)}:
        sel = [slice(s, e) for s, e, v, d in zip(starts, ends, is_val, domains, strict=True) if (bool(v), d) == key]
        histograms[key] = np.bincount(np.concatenate([tokens[s] for s in sel]), minlength=vocab).astype(np.int64)
    return EncodedChunk(tokens, lengths, is_val, histograms)


class _ShardWriter:
    """Appends documents to the shards of one (split, domain), hashing as it writes."""

    def __init__(self, root: Path, split: str, domain: str, dtype: str, shard_tokens: int) -> None:
        self.root, self.split, self.domain, self.dtype, self.shard_tokens = root, split, domain, dtype, shard_tokens
        self.shards: list[ShardInfo] = []
        self._file = None
        self._sha = hashlib.sha256()
        self._tokens = self._docs = 0

    def add(self, tokens: np.ndarray) -> None:
        if self._file is None:
            rel = f"{self.split}/{self.domain}/shard_{len(self.shards):05d}.bin"
            self._rel = rel
            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.root / rel, "wb")  # noqa: SIM115 - closed in _close
        data = tokens.astype(self.dtype, copy=False).tobytes()
        self._file.write(data)
        self._sha.update(data)
        self._tokens += tokens.size
        self._docs += 1
        if self._tokens >= self.shard_tokens:
            self._close()

    def _close(self) -> None:
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        itemsize = np.dtype(self.dtype).itemsize
        self.shards.append(ShardInfo(
            path=self._rel, split=self.split, domain=self.domain, sha256=self._sha.hexdigest(),
            size_bytes=self._tokens * itemsize, documents=self._docs, tokens=self._tokens, dtype=self.dtype,
        ))
        self._file, self._sha, self._tokens, self._docs = None, hashlib.sha256(), 0, 0

    def finish(self) -> list[ShardInfo]:
        if self._file is not None:
            self._close()
        return self.shards


@dataclass
class ShardingResult:
    shards: list[ShardInfo]
    domains: dict[str, DomainStats]
    histograms: dict[str, np.ndarray] = field(default_factory=dict)  # "<split>/<domain>" -> counts


def histogram_file_bytes(histograms: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """The histograms as a safetensors file, byte for byte the same for the same input.

    safetensors keeps __metadata__ in a Rust HashMap seeded per process, so two keys come out
    in either order (about half of the runs): the same dataset got a different histogram
    digest. The header is rewritten with the metadata sorted by key; it is compact JSON of the
    same length, so the padding and the tensor offsets are unchanged.
    """
    from safetensors.numpy import save

    data = save(histograms, metadata=dict(sorted(metadata.items())))
    n = int.from_bytes(data[:8], "little")
    raw = data[8 : 8 + n]
    text = raw.rstrip(b" ").decode("utf-8")
    header = json.loads(text, object_pairs_hook=dict)
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    fixed = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(fixed) != len(text.encode("utf-8")) or json.loads(fixed) != json.loads(text):
        raise RuntimeError("unexpected safetensors header layout: cannot order its metadata")
    return data[:8] + fixed + raw[len(fixed):] + data[8 + n :]


def _chunks(docs: list[Document]) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc.text)
        if size >= _CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def write_shards(
    docs: list[Document],
    model_path: Path,
    vocab_size: int,
    dtype: str,
    out_dir: Path,
    shard_tokens: int,
    val_fraction: float,
    seed: int,
    imap: Callable[[Callable, Iterable], Iterator] = map,
    progress: Callable[[float], None] | None = None,
) -> ShardingResult:
    """Tokenize docs (in order, through `imap`, e.g. a pool's) into shards under out_dir."""
    domain_names = sorted({d.domain for d in docs})
    domain_index = {name: i for i, name in enumerate(domain_names)}
    model_digest = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()
    chunks = list(_chunks(docs))
    tasks = (
        (str(model_path), model_digest, [d.text for d in c], [d.digest for d in c], [domain_index[d.domain] for d in c],
         seed, val_fraction, dtype, vocab_size)
        for c in chunks
    )
    writers: dict[tuple[str, str], _ShardWriter] = {}
    stats = {name: DomainStats() for name in domain_names}
    hist: dict[str, np.ndarray] = {}
    for n, (chunk, enc) in enumerate(zip(chunks, imap(encode_task, tasks), strict=True), start=1):
        ends = np.cumsum(enc.lengths)
        for doc, end, length, val in zip(chunk, ends, enc.lengths, enc.is_val, strict=True):
            split = "val" if val else "train"
            key = (split, doc.domain)
            if key not in writers:
                writers[key] = _ShardWriter(out_dir, split, doc.domain, dtype, shard_tokens)
            writers[key].add(enc.tokens[end - length : end])
            s = stats[doc.domain]
            s.documents += 1
            s.text_bytes += len(doc.text.encode("utf-8"))
            if val:
                s.val_documents += 1
                s.val_tokens += int(length)
            else:
                s.train_documents += 1
                s.train_tokens += int(length)
        for (val, d), counts in enc.histograms.items():
            name = f"{'val' if val else 'train'}/{domain_names[d]}"
            hist[name] = hist[name] + counts if name in hist else counts
        if progress:
            progress(n / len(chunks))
    shards = [s for key in sorted(writers) for s in writers[key].finish()]
    return ShardingResult(shards, stats, dict(sorted(hist.items())))
