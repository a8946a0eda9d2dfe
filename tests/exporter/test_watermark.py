"""The keyed watermark: detected with its key only, function-preserving, robust to fp16 and a short fine-tune."""

from __future__ import annotations

import math

import pytest
import torch

from services.exporter.watermark import derive_watermark_key, detect_watermark, embed_watermark
from shared.model import Llama, model_preset

from .conftest import train_steps, trained_model, val_loss

KEY = "watermark-key-1"


@pytest.fixture(scope="module")
def marked(trained):
    torch.set_num_threads(1)
    state = embed_watermark(trained.state, trained.config, KEY)
    model = Llama(trained.config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_detected_with_its_key_with_a_tiny_false_positive_bound(marked, trained):
    res = detect_watermark(marked.state_dict(), trained.config, KEY)
    assert res.detected and res.z > 20
    assert res.fp_bound < 1e-50 and res.p_value < 1e-50
    assert res.units == trained.config.n_layer * (384 + 2 * 32 + 2 * 16)
    assert 0.08 < res.estimated_strength < 0.12  # the 0.1 embedded


def test_not_detected_with_another_key_nor_on_unmarked_models(marked, trained):
    zs = []
    for key in ("watermark-key-2", "x", derive_watermark_key("some-signing-key")):
        res = detect_watermark(marked.state_dict(), trained.config, key)
        assert not res.detected
        zs.append(res.z)
    assert not detect_watermark(trained.state, trained.config, KEY).detected
    torch.manual_seed(3)
    other = Llama(model_preset("tiny")).state_dict()
    assert not detect_watermark(other, trained.config, KEY).detected
    assert all(abs(z) < 4.5 for z in zs)  # N(0, 1) under the null


def test_null_scores_are_standard_normal_over_many_keys(trained):
    zs = torch.tensor([detect_watermark(trained.state, trained.config, f"k{i}").z for i in range(40)])
    assert abs(float(zs.mean())) < 0.6 and 0.5 < float(zs.std()) < 1.6


def test_function_preserving_and_validation_perplexity_cost_below_a_tenth_of_a_percent(marked, trained):
    base = trained_model(trained)
    x = torch.from_numpy(trained.val[:257].astype("int64"))[None, :256]
    with torch.no_grad():
        assert (marked(x) - base(x)).abs().max() < 1e-4
    ppl_base, ppl_marked = math.exp(val_loss(base, trained.val)), math.exp(val_loss(marked, trained.val))
    assert abs(ppl_marked / ppl_base - 1) <= 1e-3, (ppl_base, ppl_marked)


def test_survives_fp16_conversion(marked, trained):
    half = {k: v.half() for k, v in marked.state_dict().items()}
    res = detect_watermark(half, trained.config, KEY)
    assert res.detected and res.z > 20


def test_survives_a_short_fine_tune_on_the_same_data(marked, trained):
    tuned = Llama(trained.config)
    tuned.load_state_dict(marked.state_dict())
    before = val_loss(tuned, trained.val)
    train_steps(tuned, trained.train, 300, lr=1e-4, seed=7)
    assert val_loss(tuned, trained.val) < before  # it did learn
    moved = max(float((a - b).abs().max()) for a, b in zip(tuned.state_dict().values(),
                                                           marked.state_dict().values(), strict=True))
    assert moved > 1e-3
    res = detect_watermark(tuned.state_dict(), trained.config, KEY)
    assert res.detected and res.z > 10, res


def test_strength_out_of_range_is_refused(trained):
    with pytest.raises(ValueError, match="strength"):
        embed_watermark(trained.state, trained.config, KEY, strength=1.5)
