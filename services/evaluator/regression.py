"""Regression detection with paired tests over the same documents and items.

Two models scored on the same validation documents (and the same suite items) give paired
differences; the paired bootstrap resamples documents (within each domain: stratified) and
reports a percentile confidence interval of the statistic. A regression gate fails only when
the whole interval lies beyond its threshold, i.e. when the lower bound of the degradation
exceeds it: noise never fails a gate, and a small but certain degradation within the
threshold does not either. Binary items also get McNemar's exact p-value.

Each gate's `detail` is a JSON object: verdict (pass/regression/error), statistic, estimate,
ci [low, high], confidence, threshold, n, resamples, seed, reference.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from contracts import GateResult

from .heldout import HeldoutResult
from .suites import SuiteResult

_CHUNK_CELLS = 4_000_000  # index cells per bootstrap chunk (32 MB of int64)


class PairingError(ValueError):
    """Two results cannot be compared pairwise (different documents or items)."""


@dataclass
class PairedTest:
    statistic: str
    estimate: float
    ci_low: float
    ci_high: float
    confidence: float
    n: int
    resamples: int
    seed: int
    p_value: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def paired_bootstrap(
    diff: np.ndarray,
    weight: np.ndarray | None = None,
    strata: np.ndarray | None = None,
    *,
    transform: Callable[[np.ndarray], np.ndarray] = lambda r: r,
    statistic: str = "mean_diff",
    samples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedTest:
    """Bootstrap CI of transform(sum diff / sum weight) over resampled units (rows), stratified.

    diff: per-unit paired difference; weight: per-unit denominator (default 1: a mean);
    strata: per-unit group id, each group resampled to its own size.
    """
    diff = np.asarray(diff, dtype=np.float64)
    n = diff.size
    if n == 0:
        raise PairingError("no paired units to compare")
    weight = np.ones(n) if weight is None else np.asarray(weight, dtype=np.float64)
    strata = np.zeros(n, dtype=np.int64) if strata is None else np.asarray(strata)
    estimate = float(transform(np.array([diff.sum() / weight.sum()]))[0])
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    stats = np.empty(samples)
    chunk = max(1, _CHUNK_CELLS // n)
    for lo in range(0, samples, chunk):
        m = min(chunk, samples - lo)
        num = np.zeros(m)
        den = np.zeros(m)
        for g in groups:
            idx = g[rng.integers(0, g.size, size=(m, g.size))]  # [m, |g|]
            num += diff[idx].sum(1)
            den += weight[idx].sum(1)
        stats[lo:lo + m] = transform(num / den)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return PairedTest(statistic, estimate, float(low), float(high), confidence, n, samples, seed)


def mcnemar_exact(new: Sequence[float], old: Sequence[float]) -> float:
    """Two-sided exact McNemar p-value for paired binary outcomes (1 when no discordant pair)."""
    b = sum(1 for x, y in zip(new, old, strict=True) if x >= 0.5 > y)  # new right, old wrong
    c = sum(1 for x, y in zip(new, old, strict=True) if y >= 0.5 > x)
    k, n = min(b, c), b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def relative_ppl_test(
    current: HeldoutResult, reference: HeldoutResult, *, samples: int = 2000, confidence: float = 0.95, seed: int = 0,
) -> PairedTest:
    """Relative increase of validation perplexity, exp((NLL_cur - NLL_ref) / tokens) - 1, paired by document."""
    if sorted(current.domains) != sorted(reference.domains):
        raise PairingError(f"domains differ: {sorted(current.domains)} vs {sorted(reference.domains)}")
    diffs, tokens, strata = [], [], []
    for s, name in enumerate(sorted(current.domains)):
        a, b = current.domains[name], reference.domains[name]
        if not np.array_equal(a.doc_tokens, b.doc_tokens):
            raise PairingError(f"domain {name!r}: the two results scored different documents "
                               "(another dataset, seq_len or token cap); evaluate both the same way")
        diffs.append(a.doc_nll - b.doc_nll)
        tokens.append(a.doc_tokens)
        strata.append(np.full(a.doc_nll.size, s))
    return paired_bootstrap(np.concatenate(diffs), np.concatenate(tokens), np.concatenate(strata),
                            transform=np.expm1, statistic="relative_ppl_increase",
                            samples=samples, confidence=confidence, seed=seed)


def score_drop_test(
    current: SuiteResult, reference: SuiteResult, *, samples: int = 2000, confidence: float = 0.95, seed: int = 0,
) -> PairedTest:
    """Drop of the mean item score (reference - current), paired by item id."""
    cur, ref = current.scores(), reference.scores()
    if set(cur) != set(ref):
        raise PairingError(f"suite {current.name!r}: item ids differ between the two results")
    ids = sorted(cur)
    new = np.array([cur[i] for i in ids])
    old = np.array([ref[i] for i in ids])
    test = paired_bootstrap(old - new, statistic="mean_score_drop", samples=samples, confidence=confidence, seed=seed)
    if np.isin(np.concatenate([new, old]), (0.0, 1.0)).all():
        test.p_value = mcnemar_exact(new.tolist(), old.tolist())
    return test


def _detail(verdict: str, reference: str, threshold: float | None, test: PairedTest | None = None,
            **extra: Any) -> str:
    body: dict[str, Any] = {"verdict": verdict, "reference": reference, "threshold": threshold}
    if test is not None:
        body.update(test.to_json())
        body["ci"] = [test.ci_low, test.ci_high]
        del body["ci_low"], body["ci_high"]
    body.update(extra)
    return json.dumps(body, sort_keys=True, allow_nan=True)


def regression_gates(
    reference_name: str,
    current_heldout: HeldoutResult,
    reference_heldout: HeldoutResult,
    current_suites: Sequence[SuiteResult],
    reference_suites: Sequence[SuiteResult],
    *,
    ppl_max_increase: float,
    suite_max_drop: float,
    samples: int,
    confidence: float,
    seed: int,
) -> tuple[list[GateResult], dict[str, PairedTest]]:
    """Paired regression gates against one reference: validation perplexity and each suite's score."""
    gates: list[GateResult] = []
    tests: dict[str, PairedTest] = {}
    name = f"val_ppl_regression[{reference_name}]"
    try:
        t = relative_ppl_test(current_heldout, reference_heldout, samples=samples, confidence=confidence, seed=seed)
        bad = t.ci_low > ppl_max_increase
        tests[name] = t
        gates.append(GateResult(name=name, passed=not bad,
                                detail=_detail("regression" if bad else "pass", reference_name, ppl_max_increase, t)))
    except PairingError as exc:
        gates.append(GateResult(name=name, passed=False, detail=_detail("error", reference_name, ppl_max_increase,
                                                                        error=str(exc))))
    refs = {s.name: s for s in reference_suites}
    for cur in current_suites:
        name = f"suite_regression[{reference_name}]:{cur.name}"
        ref = refs.get(cur.name)
        if ref is None:
            continue  # a suite added since the reference was scored: nothing to pair with
        try:
            t = score_drop_test(cur, ref, samples=samples, confidence=confidence, seed=seed)
        except PairingError as exc:
            gates.append(GateResult(name=name, passed=False,
                                    detail=_detail("error", reference_name, suite_max_drop, error=str(exc))))
            continue
        bad = t.ci_low > suite_max_drop
        tests[name] = t
        gates.append(GateResult(name=name, passed=not bad,
                                detail=_detail("regression" if bad else "pass", reference_name, suite_max_drop, t)))
    return gates, tests


def absolute_gates(
    val_ppl: float, suite_scores: dict[str, float], *, max_val_ppl: float | None, min_suite_scores: dict[str, float],
) -> list[GateResult]:
    """Fixed thresholds: a ceiling on perplexity, floors on suite scores."""
    gates = []
    if max_val_ppl is not None:
        ok = math.isfinite(val_ppl) and val_ppl <= max_val_ppl
        gates.append(GateResult(name="val_ppl_max", passed=ok, detail=_detail(
            "pass" if ok else "regression", "absolute", max_val_ppl, estimate=val_ppl)))
    for suite, floor in sorted(min_suite_scores.items()):
        score = suite_scores.get(suite)
        if score is None:
            gates.append(GateResult(name=f"suite_min:{suite}", passed=False, detail=_detail(
                "error", "absolute", floor, error=f"suite {suite!r} was not run")))
            continue
        ok = score >= floor
        gates.append(GateResult(name=f"suite_min:{suite}", passed=ok, detail=_detail(
            "pass" if ok else "regression", "absolute", floor, estimate=score)))
    return gates


def gate_verdict(detail: str) -> str:
    """The verdict stored in a gate's detail ('pass', 'regression' or 'error')."""
    try:
        return str(json.loads(detail).get("verdict", "pass"))
    except (json.JSONDecodeError, AttributeError):
        return "pass"
