"""Exact and MinHash near-duplicate removal: planted duplicates are found, distinct documents kept."""

from __future__ import annotations

import random

import numpy as np
import pytest

from services.data_prep.dedup import (
    EMPTY,
    candidate_probability,
    exact_dedup,
    lsh_near_duplicates,
    lsh_params,
    minhash_signatures,
    set_jaccard,
    shingle_hashes,
    shingle_set,
)
from services.data_prep.ingest import Document

from .planted import band_counts, exact_jaccard, planted_near_duplicates

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
    result = lsh_near_duplicates(sigs, 0.8, texts, ngram=5)
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
    result = lsh_near_duplicates(minhash_signatures(texts), 0.8, texts)
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
    texts = ["", "   \n", "just three words"]
    sigs = minhash_signatures(texts)
    assert (sigs[:2] == EMPTY).all() and not (sigs[2] == EMPTY).all()
    result = lsh_near_duplicates(sigs, 0.8, texts)
    assert result.keep.all()  # empty documents are never paired with each other


def test_long_document_spanning_many_chunks() -> None:
    rng = random.Random(5)
    words = random_doc(rng, 20_000)  # more shingles than one block holds
    sigs = minhash_signatures([" ".join(words), " ".join(words[:10_000])])
    assert not (sigs == EMPTY).any()
    assert 0.35 < float((sigs[0] == sigs[1]).mean()) < 0.65  # Jaccard ~0.5


def test_lsh_params_favour_recall_at_the_threshold() -> None:
    bands, rows = lsh_params(0.8, 128)
    assert (bands, rows) == (21, 6)  # 18 x 7 proposes only 98.6% of the pairs at exactly 0.8
    assert candidate_probability(0.8, bands, rows) >= 0.995
    assert 1 - (1 - 0.8**rows) ** bands == pytest.approx(0.998312, abs=1e-6)  # by hand: 1 - (1 - 0.262144)^21
    assert candidate_probability(0.3, bands, rows) < 0.02  # unrelated documents rarely become candidates
    assert lsh_params(0.8, 128, min_recall=0.98) == (18, 7)


def test_exact_dedup_keeps_first_occurrence() -> None:
    docs = [Document(t, "d", str(i)) for i, t in enumerate(["a", "b", "a", "c", "b", "a"])]
    kept, duplicates = exact_dedup(docs)
    assert [d.origin for d in kept] == ["0", "1", "3"]
    assert duplicates == [(2, 0), (4, 1), (5, 0)]  # (removed, first occurrence)
    assert all(len(d.digest) == 32 for d in docs)


@pytest.mark.parametrize("num_perm", [64, 128])
def test_signature_shape_and_dtype(num_perm: int) -> None:
    sigs = minhash_signatures(["a b c d e f g"] * 3, num_perm=num_perm)
    assert sigs.shape == (3, num_perm) and sigs.dtype == np.uint32


def test_decisions_near_the_threshold_rest_on_the_exact_jaccard() -> None:
    """Planted pairs within +-0.03 of the threshold: the 128-permutation estimate (sd ~0.035)
    decided them with precision ~0.69 and recall ~0.65; exact verification decides them all."""
    planted = planted_near_duplicates(n_pairs=240, threshold=0.8, band=0.03, n_background=150, seed=1)
    counts = band_counts(planted)
    assert counts["below"] >= 90 and counts["at_or_above"] >= 90, counts
    assert all(abs(p.jaccard - 0.8) <= 0.03 for p in planted.pairs)
    sigs = minhash_signatures(planted.texts, ngram=5, num_perm=128, seed=1)
    result = lsh_near_duplicates(sigs, 0.8, planted.texts, ngram=5)
    removed = set(np.flatnonzero(~result.keep).tolist())
    precision, recall, tp, fp, positives = planted.score(removed, result.duplicate_of)
    assert precision >= 0.98 and recall >= 0.98, (precision, recall, tp, fp, positives)
    by_variant = {p.variant: p for p in planted.pairs}
    for j, sim in result.similarity_to_kept.items():  # the reported similarity is the exact one
        assert sim == pytest.approx(by_variant[j].jaccard, abs=1e-12)
    # The estimate alone gets the same pairs wrong in both directions.
    est = lsh_near_duplicates(sigs, 0.8, verify="estimate")
    est_p, est_r, *_ = planted.score(set(np.flatnonzero(~est.keep).tolist()), est.duplicate_of)
    assert est_p < 0.9 and est_r < 0.9, (est_p, est_r)
    assert result.estimate_disagreed > 0


def test_set_jaccard_matches_python_sets() -> None:
    rng = random.Random(2)
    a, b = random_doc(rng, 80), random_doc(rng, 10)
    texts = [" ".join(a), " ".join(a[:50] + b + a[50:]), " ".join(a[:3])]
    for x in texts:
        for y in texts:
            assert set_jaccard(shingle_set(x, 5), shingle_set(y, 5)) == pytest.approx(exact_jaccard(x, y), abs=1e-12)
    # by hand: 76 shingles; inserting 10 words in the middle breaks 4 and adds 14: 72 / (76 + 14)
    assert exact_jaccard(texts[0], texts[1]) == pytest.approx(72 / 90)
    assert set_jaccard(np.array([], dtype=np.uint64), np.array([1], dtype=np.uint64)) == 0.0


def test_exact_verification_needs_the_texts() -> None:
    sigs = minhash_signatures(["a b c d e f"])
    with pytest.raises(ValueError, match="texts"):
        lsh_near_duplicates(sigs, 0.8)
