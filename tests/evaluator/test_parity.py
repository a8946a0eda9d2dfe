"""Parity checks: pass on a healthy model with their numbers, and catch what they are for."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from services.evaluator.config import ParityConfig
from services.evaluator.heldout import sample_sequences
from services.evaluator.parity import int8_parity, run_parity


def test_parity_checks_pass_on_a_healthy_model_and_report_numbers(trained, dataset):
    ids = sample_sequences(dataset, 4, 48)
    res = run_parity(trained, ids, ParityConfig())
    assert set(res) == {"batch_padding", "kv_cache", "int8_dynamic"}
    for name, numbers in res.items():
        assert numbers["passed"] is True, (name, numbers)
    assert res["batch_padding"]["max_abs_diff"] <= 1e-4 and res["batch_padding"]["min_len"] < 48
    assert res["kv_cache"]["max_abs_diff"] <= 1e-4 and res["kv_cache"]["argmax_agreement"] == 1.0
    q = res["int8_dynamic"]
    assert 0.9 <= q["top1_agreement"] <= 1.0
    assert q["ppl_int8"] > 0 and q["ppl_rel_change"] == q["ppl_int8"] / q["ppl_fp32"] - 1
    assert not trained.training


def test_int8_thresholds_decide_the_result(trained, dataset):
    ids = sample_sequences(dataset, 2, 32)
    strict = int8_parity(trained, ids, min_agreement=1.01, max_ppl_increase=0.05)
    assert strict["passed"] is False and 0 <= strict["top1_agreement"] <= 1


def test_a_check_that_raises_is_reported_failed_with_its_error(trained):
    ids = torch.randint(4, 100, (2, trained.config.max_seq_len + 8))  # longer than the RoPE tables
    res = run_parity(trained, ids, ParityConfig(int8=False))
    assert res["kv_cache"]["passed"] is False and "error" in res["kv_cache"]


def test_the_train_vs_eval_mode_check_is_gone_with_its_setting():
    """Llama has no mode-dependent layer, so that check measured 0.0 by construction; a run config
    that still sets its tolerance is refused rather than silently ignored."""
    with pytest.raises(ValidationError, match="train_eval_tol"):
        ParityConfig(train_eval_tol=1e-6)
