"""Paired regression tests: the bootstrap and McNemar, a planted regression flagged, noise not."""

from __future__ import annotations

import json

import numpy as np
import pytest

from services.evaluator.config import EvalConfig
from services.evaluator.evaluate import evaluate_checkpoint
from services.evaluator.regression import mcnemar_exact, paired_bootstrap, relative_ppl_test

from .helpers import perturbed, save


def fast_config(**kw) -> EvalConfig:
    base = dict(seq_len=128, max_val_tokens=6000, bootstrap_samples=1000, parity={"enabled": False})
    return EvalConfig(**{**base, **kw})


def test_bootstrap_of_identical_results_is_exactly_zero():
    t = paired_bootstrap(np.zeros(50), samples=200)
    assert (t.estimate, t.ci_low, t.ci_high) == (0.0, 0.0, 0.0)


def test_bootstrap_is_seeded_and_covers_a_known_shift():
    rng = np.random.default_rng(0)
    diff = 0.5 + rng.normal(0, 1, 400)
    a = paired_bootstrap(diff, samples=500, seed=3)
    b = paired_bootstrap(diff, samples=500, seed=3)
    c = paired_bootstrap(diff, samples=500, seed=4)
    assert a == b and a != c
    assert a.ci_low < 0.5 < a.ci_high and a.ci_low > 0.3  # se = 0.05
    assert a.estimate == pytest.approx(diff.mean())


def test_stratified_weighted_bootstrap_estimates_a_ratio():
    diff = np.array([1.0, 1.0, 2.0, 2.0])
    weight = np.array([10.0, 10.0, 10.0, 10.0])
    t = paired_bootstrap(diff, weight, np.array([0, 0, 1, 1]), transform=np.expm1, samples=300)
    assert t.estimate == pytest.approx(np.expm1(6 / 40))
    assert t.ci_low <= t.estimate <= t.ci_high


def test_mcnemar_exact_known_values():
    assert mcnemar_exact([1] * 10, [0] * 10) == pytest.approx(2 / 1024)
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]) == 1.0
    assert mcnemar_exact([1, 0], [0, 1]) == 1.0


def test_damaged_weights_are_flagged_as_a_significant_regression(trained, dataset, checkpoint, tmp_path):
    damaged = save(perturbed(trained, 0.3), tmp_path / "ckpts", 60)
    report = evaluate_checkpoint(damaged, dataset, fast_config(), previous_best=checkpoint, out_dir=tmp_path / "out")
    assert report.verdict == "regression"
    gate = next(g for g in report.gates if g.name == "val_ppl_regression[previous_best]")
    assert not gate.passed
    detail = json.loads(gate.detail)
    assert detail["verdict"] == "regression" and detail["threshold"] == 0.02
    assert detail["ci"][0] > 0.02 and detail["estimate"] > detail["ci"][0]
    assert detail["n"] == sum(int(d["documents"]) for d in report.domain_metrics.values())
    assert report.references["previous_best"]["step"] == 30


def test_a_noise_level_perturbation_is_not_flagged(trained, dataset, checkpoint, tmp_path):
    nudged = save(perturbed(trained, 1e-4, seed=7), tmp_path / "ckpts", 60)
    report = evaluate_checkpoint(nudged, dataset, fast_config(), previous_best=checkpoint, out_dir=tmp_path / "out")
    gate = next(g for g in report.gates if g.name == "val_ppl_regression[previous_best]")
    detail = json.loads(gate.detail)
    assert gate.passed and detail["verdict"] == "pass"
    assert abs(detail["estimate"]) < 0.005 and detail["ci"][0] < 0.02
    assert report.verdict == "pass"


def test_the_same_weights_under_another_batching_and_seed_are_not_flagged(trained, dataset, checkpoint, tmp_path):
    from services.evaluator.evaluate import _context, _load, _measure

    copy = save(trained, tmp_path / "ckpts", 60)  # same weights, another checkpoint
    cfg_a = fast_config(batch_size=1)
    cfg_b = fast_config(batch_size=32, seed=123)
    ctx = _context(dataset, cfg_a)
    a = _measure(_load(checkpoint, ctx)[0], "a", 30, ctx, cfg_a, 128)
    b = _measure(_load(copy, ctx)[0], "b", 60, ctx, cfg_b, 128)
    t = relative_ppl_test(b.heldout, a.heldout, samples=1000, seed=123)
    assert abs(t.estimate) < 1e-5 and t.ci_low <= 1e-5
    report = evaluate_checkpoint(copy, dataset, cfg_b, previous_best=checkpoint, out_dir=tmp_path / "out")
    assert report.verdict == "pass"
