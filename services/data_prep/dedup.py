"""Exact and near-duplicate removal.

Exact: SHA-256 of the normalised text; the first occurrence wins.

Near: MinHash over word n-grams with LSH banding, vectorised with numpy (measured on stdlib
sources, one core: ~45 MB/s, against ~6.5 MB/s for datasketch's MinHash.update_batch):

- words are runs of non-whitespace bytes; each is hashed with a polynomial hash computed for
  all bytes at once, then n consecutive word hashes are mixed into one 64-bit shingle hash;
- permutation j is the multiply-shift hash ((a_j * x) mod 2^64) >> 32 with a random odd a_j;
  the shift is monotone, so the minimum is taken on the products and shifted once. The
  (permutations x shingles) block is laid out so np.minimum.reduceat runs over contiguous
  rows: reducing along the other axis is 10x slower;
- bands x rows are chosen for recall at the threshold (see lsh_params): LSH only proposes
  candidate pairs (documents sharing a bucket in some band);
- every candidate is decided on its EXACT Jaccard similarity, |A & B| / |A | B| over the two
  documents' sets of 64-bit shingle hashes (exact up to a hash collision, ~2^-64 per pair).
  The 128-permutation estimate has a standard deviation of ~0.035 near 0.8, so deciding on it
  removed pairs at 0.74-0.79 and kept pairs at 0.80-0.85 (precision 0.69, recall 0.65 on
  planted pairs within +-0.03 of the threshold); exact verification costs one sorted-array
  intersection per candidate, and only documents in some candidate pair are re-shingled;
- each connected component of verified pairs keeps its first document; every other member
  is reported as a duplicate of it (NearDupResult.duplicate_of), with its exact similarity to
  that kept document (which can be below the threshold when it joined through a chain).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cache
from typing import Literal

import numpy as np

from services.data_prep.ingest import Document

_U64 = np.uint64
_FMIX1 = _U64(0xFF51AFD7ED558CCD)
_FMIX2 = _U64(0xC4CEB9FE1A85EC53)
_WORD_MULT = _U64(0x100000001B3)  # FNV prime as the polynomial base
_POW_BITS = 12  # byte positions in a word wrap at 4096: only the hash's spread, not its correctness
_CHUNK_SHINGLES = 1 << 12  # columns of the (permutations x shingles) block: 128 x 4k x 8 B = 4 MiB, cache-sized
_MAX_BUCKET_PAIRS = 64  # buckets larger than this are linked as a star + chain, not all pairs

_SPACE = np.zeros(256, dtype=bool)
_SPACE[[9, 10, 11, 12, 13, 32]] = True
_POW = np.cumprod(np.full(1 << _POW_BITS, _WORD_MULT, dtype=_U64), dtype=_U64)


def _fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, in place on a uint64 array."""
    x ^= x >> _U64(33)
    x *= _FMIX1
    x ^= x >> _U64(33)
    x *= _FMIX2
    x ^= x >> _U64(33)
    return x


def word_hashes(data: bytes) -> np.ndarray:
    """64-bit hash of every whitespace-separated word of UTF-8 bytes, in order."""
    b = np.frombuffer(data, dtype=np.uint8)
    if b.size == 0:
        return np.empty(0, dtype=_U64)
    word = ~_SPACE[b]
    start = word.copy()
    start[1:] &= ~word[:-1]
    idx = np.flatnonzero(word)
    if idx.size == 0:
        return np.empty(0, dtype=_U64)
    is_start = start[idx]
    seg = np.flatnonzero(is_start)
    pos = idx - idx[seg][np.cumsum(is_start) - 1]
    vals = (b[idx].astype(_U64) + _U64(1)) * _POW[pos & ((1 << _POW_BITS) - 1)]
    return _fmix64(np.add.reduceat(vals, seg))


@cache
def _shingle_mults(ngram: int) -> np.ndarray:
    rng = np.random.default_rng(0x5EED + ngram)
    return rng.integers(1, 1 << 63, size=ngram, dtype=np.uint64) | _U64(1)


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """64-bit hashes of the word n-grams of a text (one shingle when it has fewer words)."""
    w = word_hashes(text.encode("utf-8"))
    if w.size == 0:
        return w
    k = min(ngram, w.size)
    mults = _shingle_mults(ngram)
    n = w.size - k + 1
    acc = w[:n] * mults[0]
    for j in range(1, k):
        acc += w[j : j + n] * mults[j]
    return _fmix64(acc)


@cache
def _perm_mults(num_perm: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 1 << 63, size=num_perm, dtype=np.uint64) << _U64(1) | _U64(1)


EMPTY = np.uint32(0xFFFFFFFF)


def minhash_signatures(texts: list[str], ngram: int = 5, num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """MinHash signatures, shape (len(texts), num_perm), uint32; a text without words is all EMPTY."""
    a = _perm_mults(num_perm, seed)
    out = np.full((len(texts), num_perm), EMPTY, dtype=np.uint32)
    pieces: list[np.ndarray] = []
    owners: list[int] = []
    pending = 0

    def flush() -> None:
        nonlocal pending
        s = np.concatenate(pieces)
        h = np.multiply.outer(a, s)  # (P, S)
        starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
        mins = (np.minimum.reduceat(h, starts, axis=1) >> _U64(32)).astype(np.uint32)  # (P, pieces)
        np.minimum.at(out, np.asarray(owners), mins.T)
        pieces.clear()
        owners.clear()
        pending = 0

    for i, text in enumerate(texts):
        s = shingle_hashes(text, ngram)
        for lo in range(0, s.size, _CHUNK_SHINGLES):
            piece = s[lo : lo + _CHUNK_SHINGLES]
            pieces.append(piece)
            owners.append(i)
            pending += piece.size
            if pending >= _CHUNK_SHINGLES:
                flush()
    if pieces:
        flush()
    return out


@cache
def lsh_params(threshold: float, num_perm: int, min_recall: float = 0.995) -> tuple[int, int]:
    """(bands, rows): the most rows (fewest candidates) that still make a pair at the threshold a
    candidate with probability >= min_recall.

    Candidates are verified exactly afterwards, so a false positive costs one comparison while
    a false negative is a duplicate kept: datasketch's balanced choice (9 x 13 for 0.8/128)
    finds only 40% of pairs at Jaccard 0.8; 18 x 7 finds 98.6%, 21 x 6 (the choice for 0.995)
    99.8%.
    """
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if candidate_probability(threshold, bands, rows) >= min_recall:
            return bands, rows
    return num_perm, 1


def candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    """Probability that LSH with bands x rows proposes a pair of this Jaccard similarity."""
    return 1 - (1 - jaccard**rows) ** bands


@dataclass
class NearDupResult:
    """Which documents near dedup keeps, and how it got there."""

    keep: np.ndarray  # bool per document
    bands: int
    rows: int
    candidate_pairs: int
    verified_pairs: int
    clusters: int  # connected components with more than one member
    pairs: list[tuple[int, int]] = field(default_factory=list)  # verified (i, j), i < j
    similarity: list[float] = field(default_factory=list)  # of each verified pair (exact, or the estimate)
    duplicate_of: dict[int, int] = field(default_factory=dict)  # removed -> the kept document of its cluster
    similarity_to_kept: dict[int, float] = field(default_factory=dict)  # removed -> similarity to that document
    linked_via: dict[int, int] = field(default_factory=dict)  # removed -> its most similar partner, when the
    # pair (kept, removed) itself was not verified (the removed document joined the cluster through a chain)
    estimate_disagreed: int = 0  # candidates where the signature estimate and the exact value disagree


def _find(parent: np.ndarray, i: int) -> int:
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:
        parent[i], i = root, parent[i]
    return root


def lsh_candidates(sigs: np.ndarray, bands: int, rows: int) -> list[tuple[int, int]]:
    """Sorted pairs (i, j), i < j, of documents sharing a bucket in at least one band."""
    valid = ~(sigs == EMPTY).all(axis=1)
    ids = np.flatnonzero(valid)
    band_mults = _shingle_mults(rows)
    candidates: set[tuple[int, int]] = set()
    for band in range(bands):
        block = sigs[ids, band * rows : (band + 1) * rows].astype(_U64)
        key = block[:, 0] * band_mults[0]
        for r in range(1, rows):
            key += block[:, r] * band_mults[r]
        key = _fmix64(key)
        order = np.argsort(key, kind="stable")
        sk = key[order]
        bounds = np.flatnonzero(np.diff(sk)) + 1
        starts = np.concatenate(([0], bounds))
        ends = np.concatenate((bounds, [sk.size]))
        for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1], strict=True):
            members = np.sort(ids[order[s:e]])
            if members.size * (members.size - 1) // 2 <= _MAX_BUCKET_PAIRS:
                for x in range(members.size):
                    for y in range(x + 1, members.size):
                        candidates.add((int(members[x]), int(members[y])))
            else:  # a huge bucket: star around the first member plus a chain keeps it linear
                for x in range(1, members.size):
                    candidates.add((int(members[0]), int(members[x])))
                    candidates.add((int(members[x - 1]), int(members[x])))
    return sorted(candidates)


def shingle_set(text: str, ngram: int) -> np.ndarray:
    """The sorted, unique 64-bit shingle hashes of a text: its shingle set."""
    return np.unique(shingle_hashes(text, ngram))


def set_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted unique arrays (1.0 for two empty sets)."""
    if a.size == 0 and b.size == 0:
        return 1.0
    if a.size > b.size:
        a, b = b, a
    pos = np.searchsorted(b, a)
    pos[pos == b.size] = 0
    inter = int(np.count_nonzero(b[pos] == a))
    return inter / (a.size + b.size - inter)


def lsh_near_duplicates(
    sigs: np.ndarray,
    threshold: float,
    texts: list[str] | None = None,
    ngram: int = 5,
    *,
    verify: Literal["exact", "estimate"] = "exact",
    min_recall: float = 0.995,
) -> NearDupResult:
    """Near-duplicate clusters from MinHash signatures; each cluster keeps its lowest index.

    verify="exact" (the pipeline's) decides every LSH candidate on the exact Jaccard similarity
    of the texts' shingle sets (texts and ngram must be those the signatures were made from);
    verify="estimate" decides on the fraction of equal signature values, the old behaviour,
    kept only to measure what exact verification changes (benchmarks/data_prep.py).
    """
    n, num_perm = sigs.shape
    bands, rows = lsh_params(threshold, num_perm, min_recall)
    pairs = lsh_candidates(sigs, bands, rows)
    sets: dict[int, np.ndarray] = {}

    def exact(i: int, j: int) -> float:
        for k in (i, j):
            if k not in sets:
                sets[k] = shingle_set(texts[k], ngram)  # type: ignore[index]
        return set_jaccard(sets[i], sets[j])

    if verify == "exact" and texts is None:
        raise ValueError("exact verification needs the texts the signatures were computed from")
    estimates = (
        (sigs[np.asarray(pairs)[:, 0]] == sigs[np.asarray(pairs)[:, 1]]).mean(axis=1) if pairs else np.empty(0)
    )
    verified: list[tuple[int, int]] = []
    similarity: list[float] = []
    disagreed = 0
    for (i, j), est in zip(pairs, estimates.tolist(), strict=True):
        if verify == "exact":
            sim = exact(i, j)
            disagreed += (sim >= threshold) != (est >= threshold)
        else:
            sim = est
        if sim >= threshold:
            verified.append((i, j))
            similarity.append(sim)
    parent = np.arange(n)
    for i, j in verified:
        ri, rj = _find(parent, i), _find(parent, j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)  # the root is the lowest index: it is kept
    roots = np.array([_find(parent, i) for i in range(n)])
    keep = roots == np.arange(n)
    clusters = len(set(roots[~keep].tolist()))
    duplicate_of = {int(j): int(roots[j]) for j in np.flatnonzero(~keep)}
    pair_sim = dict(zip(verified, similarity, strict=True))
    best: dict[int, tuple[float, int]] = {}  # document -> (highest similarity, partner) over verified pairs
    for (i, j), sim in pair_sim.items():
        for a, b in ((i, j), (j, i)):
            if a not in best or sim > best[a][0]:
                best[a] = (sim, b)
    to_kept, via = {}, {}
    for j, root in duplicate_of.items():
        if (root, j) in pair_sim:
            to_kept[j] = pair_sim[(root, j)]
            continue
        via[j] = best[j][1]
        if verify == "exact":
            to_kept[j] = exact(root, j)
        else:
            to_kept[j] = float((sigs[root] == sigs[j]).mean())
    return NearDupResult(
        keep, bands, rows, len(pairs), len(verified), clusters, verified, similarity, duplicate_of, to_kept, via,
        disagreed,
    )


def exact_dedup(docs: list[Document]) -> tuple[list[Document], list[tuple[int, int]]]:
    """Drop documents whose text was seen before; sets each document's digest (the SHA-256 of its
    text) unless it is set already (the pipeline's ingest tasks set it in the workers).

    Returns the kept documents and (removed, first occurrence) index pairs into `docs`.
    """
    first: dict[bytes, int] = {}
    kept, duplicates = [], []
    for i, doc in enumerate(docs):
        digest = doc.digest or hashlib.sha256(doc.text.encode("utf-8")).digest()
        doc.digest = digest
        if digest in first:
            duplicates.append((i, first[digest]))
            continue
        first[digest] = i
        kept.append(doc)
    return kept, duplicates
