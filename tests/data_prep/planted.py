"""Planted near-duplicates with exactly computed Jaccard similarity around a threshold.

Documents are random words from a large vocabulary, so their word n-grams are (almost all)
distinct; a variant replaces runs of words by fresh tokens that occur nowhere else. Every
pair's Jaccard similarity over word n-gram sets is then computed exactly with Python sets
(the same shingles as services.data_prep.dedup: n consecutive whitespace-separated words,
one shingle for a text with fewer words), never assumed from the edit count.

Used by tests/data_prep/test_dedup.py and benchmarks/data_prep.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

VOCAB_SIZE = 50_000


def shingle_set(text: str, ngram: int = 5) -> set[tuple[str, ...]]:
    """The word n-grams of a text (the whole text as one shingle when it has fewer words)."""
    words = text.split()
    if not words:
        return set()
    k = min(ngram, len(words))
    return {tuple(words[i : i + k]) for i in range(len(words) - k + 1)}


def exact_jaccard(a: str, b: str, ngram: int = 5) -> float:
    sa, sb = shingle_set(a, ngram), shingle_set(b, ngram)
    union = len(sa | sb)
    return len(sa & sb) / union if union else 0.0


@dataclass
class PlantedPair:
    original: int  # index in PlantedSet.texts
    variant: int
    jaccard: float  # exact


@dataclass
class PlantedSet:
    texts: list[str]
    pairs: list[PlantedPair]
    threshold: float
    background: list[int] = field(default_factory=list)  # unrelated documents, no duplicate planted

    def score(self, removed: set[int], duplicate_of: dict[int, int]) -> tuple[float, float, int, int, int]:
        """(precision, recall, true positives, false positives, positives) of removal decisions.

        A planted pair at or above the threshold is a positive: found (a true positive) when its
        variant is removed as a duplicate of its original. Every other removal (a variant below
        the threshold, an original, a background document, a variant credited to the wrong
        document) is a false positive.
        """
        positives = [p for p in self.pairs if p.jaccard >= self.threshold]
        tp = sum(1 for p in positives if p.variant in removed and duplicate_of.get(p.variant) == p.original)
        fp = len(removed) - tp
        precision = tp / (tp + fp) if tp + fp else 1.0
        recall = tp / len(positives) if positives else 1.0
        return precision, recall, tp, fp, len(positives)


def _variant(rng: random.Random, words: list[str], edits: int, tag: str) -> list[str]:
    """Replace `edits` runs of 1-3 words, at random places, by fresh tokens."""
    out = list(words)
    for e in range(edits):
        run = rng.randint(1, 3)
        at = rng.randrange(0, len(out) - run + 1)
        for r in range(run):
            out[at + r] = f"{tag}e{e}r{r}"
    return out


def planted_near_duplicates(
    n_pairs: int,
    threshold: float = 0.8,
    band: float = 0.03,
    n_background: int = 0,
    seed: int = 0,
    ngram: int = 5,
    min_words: int = 300,
    max_words: int = 1_200,
) -> PlantedSet:
    """n_pairs (original, variant) pairs with exact Jaccard spread over [threshold - band, threshold + band],
    interleaved with n_background unrelated documents; the order of documents is shuffled
    except that an original always comes before its variant (the first occurrence is kept).
    """
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(VOCAB_SIZE)]
    docs: list[list[str]] = []
    pair_words: list[tuple[int, int, float]] = []
    for p in range(n_pairs):
        target = rng.uniform(threshold - band, threshold + band)
        while True:
            words = rng.choices(vocab, k=rng.randint(min_words, max_words))
            shingles = len(words) - ngram + 1
            # One replaced run of length r changes up to ngram + r - 1 of the shingles on each side:
            # J = (S - c) / (S + c) for c changed shingles, so c = S (1 - J) / (1 + J).
            edits = max(1, round(shingles * (1 - target) / (1 + target) / (ngram + 1)))
            variant = _variant(rng, words, edits, f"p{p}")
            j = exact_jaccard(" ".join(words), " ".join(variant), ngram)
            if abs(j - target) <= band / 3 and abs(j - threshold) <= band:
                break
        docs.append(words)
        docs.append(variant)
        pair_words.append((len(docs) - 2, len(docs) - 1, j))
    background_ids = []
    for _ in range(n_background):
        background_ids.append(len(docs))
        docs.append(rng.choices(vocab, k=rng.randint(min_words, max_words)))
    # Shuffle, keeping each original before its variant.
    order = list(range(len(docs)))
    rng.shuffle(order)
    pos = {old: new for new, old in enumerate(order)}
    for o, v, _ in pair_words:
        if pos[o] > pos[v]:
            pos[o], pos[v] = pos[v], pos[o]
    texts = [""] * len(docs)
    for old, new in pos.items():
        texts[new] = " ".join(docs[old])
    pairs = [PlantedPair(pos[o], pos[v], j) for o, v, j in pair_words]
    return PlantedSet(texts, pairs, threshold, sorted(pos[b] for b in background_ids))


def band_counts(planted: PlantedSet) -> dict[str, int]:
    """How many planted pairs fall below / at or above the threshold."""
    js = np.array([p.jaccard for p in planted.pairs])
    return {"below": int((js < planted.threshold).sum()), "at_or_above": int((js >= planted.threshold).sum())}
