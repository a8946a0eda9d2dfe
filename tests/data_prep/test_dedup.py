"""Exact and MinHash near-duplicate removal: planted duplicates are found, distinct documents kept."""

from __future__ import annotations

import random

import numpy as np
import pytest

from services.data_prep.dedup import (
    EMPTY,
    exact_dedup,
    lsh_near_duplicates,
    lsh_params,
    minhash_signatures,
    shingle_hashes,
)
from services.data_prep.ingest import Document

VOCAB = [f"w{i}" for i in range(5_000)]


def random_doc(rng: random.Random, n_words: int) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n_words)]


def small_edit(rng: random.Random, words: list[str], edits: int) -> list[str]:
    out = list(words)
    for _ in range(edits):
        op = rng.choice(["replace", "insert", "delete"])
        i = rng.randrange(len(out))
        if op == "replace":
            out[i] = rng.choice(VOCAB)
        elif op == "insert":
            out.insert(i, rng.choice(VOCAB))
        else:
            del out[i]
    return out


def jaccard(a: str, b: str, n: int = 5) -> float:
    def grams(t: str) -> set[tuple[str, ...]]:
        w = t.split()
        return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}

    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


def test_planted_near_duplicates_found_with_high_precision_and_recall() -> None:
    rng = random.Random(7)
    originals = [random_doc(rng, rng.randint(200, 400)) for _ in range(400)]
    texts = [" ".join(w) for w in originals]
    planted: dict[int, int] = {}  # copy index -> original index
    for orig in rng.sample(range(len(originals)), 80):
        planted[len(texts)] = orig
        texts.append(" ".join(small_edit(rng, originals[orig], rng.randint(1, 3))))
    truth_pairs = {(o, c) for c, o in planted.items()}
    assert all(jaccard(texts[o], texts[c]) >= 0.85 for o, c in truth_pairs)

    sigs = minhash_signatures(texts, ngram=5, num_perm=128, seed=1)
    result = lsh_near_duplicates(sigs, threshold=0.8)
    found = set(result.pairs)
    precision = len(found & truth_pairs) / max(len(found), 1)
    recall = len(found & truth_pairs) / len(truth_pairs)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    removed = set(np.flatnonzero(~result.keep).tolist())
    assert removed <= set(planted)  # copies go, originals (lower index) stay
    assert len(removed) >= 0.95 * len(planted)


def test_dissimilar_documents_are_not_paired() -> None:
    rng = random.Random(3)
    base = random_doc(rng, 300)
    # Jaccard ~0.5: half the text shared
    other = base[:150] + random_doc(rng, 150)
    texts = [" ".join(base), " ".join(other)]
    assert jaccard(*texts) < 0.6
    result = lsh_near_duplicates(minhash_signatures(texts), threshold=0.8)
    assert result.keep.all() and result.pairs == []


def test_signature_agreement_estimates_jaccard() -> None:
    rng = random.Random(11)
    base = random_doc(rng, 500)
    for edits in (5, 20, 60):
        other = small_edit(rng, base, edits)
        a, b = " ".join(base), " ".join(other)
        sigs = minhash_signatures([a, b], num_perm=256)
        estimate = float((sigs[0] == sigs[1]).mean())
        assert abs(estimate - jaccard(a, b)) < 0.1, (edits, estimate, jaccard(a, b))


def test_signatures_are_deterministic_and_whitespace_insensitive() -> None:
    text = "def f(x):\n    return x + 1\n" * 20
    again = text.replace("    ", "\t")
    s1, s2 = minhash_signatures([text, again]), minhash_signatures([text, again])
    assert np.array_equal(s1, s2)
    assert np.array_equal(s1[0], s1[1])  # words are runs of non-whitespace


def test_short_and_empty_texts() -> None:
    assert shingle_hashes("", 5).size == 0
    assert shingle_hashes("just three words", 5).size == 1
    sigs = minhash_signatures(["", "   \n", "just three words"])
    assert (sigs[:2] == EMPTY).all() and not (sigs[2] == EMPTY).all()
    result = lsh_near_duplicates(sigs, 0.8)
    assert result.keep.all()  # empty documents are never paired with each other


def test_long_document_spanning_many_chunks() -> None:
    rng = random.Random(5)
    words = random_doc(rng, 20_000)  # more shingles than one block holds
    sigs = minhash_signatures([" ".join(words), " ".join(words[:10_000])])
    assert not (sigs == EMPTY).any()
    assert 0.35 < float((sigs[0] == sigs[1]).mean()) < 0.65  # Jaccard ~0.5


def test_lsh_params_favour_recall_at_the_threshold() -> None:
    bands, rows = lsh_params(0.8, 128)
    assert bands * rows <= 128 and bands > 1 and rows > 1
    assert 1 - (1 - 0.8**rows) ** bands >= 0.98
    assert 1 - (1 - 0.3**rows) ** bands < 0.01  # unrelated documents rarely become candidates


def test_exact_dedup_keeps_first_occurrence() -> None:
    docs = [Document(t, "d", str(i)) for i, t in enumerate(["a", "b", "a", "c", "b", "a"])]
    kept, removed = exact_dedup(docs)
    assert [d.origin for d in kept] == ["0", "1", "3"]
    assert removed == 3
    assert all(len(d.digest) == 32 for d in kept)


@pytest.mark.parametrize("num_perm", [64, 128])
def test_signature_shape_and_dtype(num_perm: int) -> None:
    sigs = minhash_signatures(["a b c d e f g"] * 3, num_perm=num_perm)
    assert sigs.shape == (3, num_perm) and sigs.dtype == np.uint32
