"""Each probe's value against a number worked out by hand on a model whose weights are set to known values.

The model: vocabulary 4, width 2, one head, two layers. Attention (q, k, v, o) and the MLPs' down
projections are zero, so every block passes the residual stream through unchanged: after each block
it is still the embedding, token i -> [i + 1, 0]. RMSNorm of [v, 0] is [sqrt(2), 0] whatever v is,
so the MLP input and the head input are that same vector at every position:

    logits  = sqrt(2) * lm_head[:, 0] = [ln 1, ln 2, ln 3, ln 4]  ->  p = [0.1, 0.2, 0.3, 0.4] everywhere
    MLP unit j of a layer: |silu(sqrt 2 * gate_j) * sqrt 2 * up_j|, with gate_j = 1 for every unit
    attention: q = k = 0, so each position attends uniformly to the t + 1 positions it sees
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from services.trainer.probes import (
    DomainLossProbe,
    LayerStatsProbe,
    PerplexityProbe,
    ProbeContext,
    RareTokenProbe,
    TokenDriftProbe,
)
from shared.model import Llama, ModelConfig

P = [0.1, 0.2, 0.3, 0.4]  # the model's prediction at every position
UP = {0: [1.0, 0.5, 0.01, 0.0], 1: [1.0, 1.0, 1.0, 0.001]}  # up_proj[:, 0] per layer; column 1 is 0
IDS = [[0, 1, 2], [3, 2, 1]]
LABELS = [[1, 2, 3], [0, 1, 1]]
MASK = [[1, 1, 1], [1, 1, 0]]  # the last label does not count
RATIO = 0.1  # dead below a tenth of the layer's mean |activation|


def known_model() -> Llama:
    cfg = ModelConfig(vocab_size=4, n_layer=2, n_head=1, n_kv_head=1, d_model=2, ffn_hidden=4, max_seq_len=8,
                      norm_eps=1e-12, tie_embeddings=False)
    model = Llama(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in [model.norm, *(n for b in model.layers for n in (b.input_layernorm, b.post_attention_layernorm))]:
            norm.weight.fill_(1.0)
        model.embed_tokens.weight[:, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
        model.lm_head.weight[:, 0] = torch.tensor([math.log(k) for k in (1, 2, 3, 4)]) / math.sqrt(2)
        for i, block in enumerate(model.layers):
            block.mlp.gate_proj.weight[:, 0] = 1.0
            block.mlp.up_proj.weight[:, 0] = torch.tensor(UP[i])
    return model


def context(batch: dict[str, torch.Tensor] | None = None) -> ProbeContext:
    batch = batch or {"input_ids": torch.tensor(IDS), "labels": torch.tensor(LABELS),
                      "loss_mask": torch.tensor(MASK, dtype=torch.float32), "domain": torch.tensor([0, 1])}
    return ProbeContext(known_model(), batch, 1, ["code", "prose"], RATIO, contextlib.nullcontext)


def kl(p: list[float], q: list[float]) -> float:
    sp, sq = sum(p), sum(q)
    return sum(a / sp * math.log((a / sp) / (b / sq)) for a, b in zip(p, q, strict=True) if a > 0)


def js(p: list[float], q: list[float]) -> float:
    sp, sq = sum(p), sum(q)
    p, q = [a / sp for a in p], [b / sq for b in q]
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def test_the_hand_built_model_predicts_the_designed_distribution():
    cap = context().capture()
    assert cap.mean_pred.tolist() == pytest.approx(P, rel=1e-5)


def test_perplexity_is_exp_of_the_mean_masked_token_loss():
    ctx = context()
    PerplexityProbe().on_probe(None, ctx)
    counted = [P[label] for row, mrow in zip(LABELS, MASK, strict=True) for label, m in zip(row, mrow, strict=True) if m]
    assert counted == [0.2, 0.3, 0.4, 0.1, 0.2]
    assert ctx.values["ppl"] == pytest.approx(math.prod(counted) ** (-1 / 5), rel=1e-5)  # ~4.57


def test_domain_loss_is_the_mean_masked_loss_of_each_domain_s_sequences():
    ctx = context()
    DomainLossProbe().on_probe(None, ctx)
    assert ctx.values["domain_loss/code"] == pytest.approx(-(math.log(0.2) + math.log(0.3) + math.log(0.4)) / 3,
                                                           rel=1e-5)
    assert ctx.values["domain_loss/prose"] == pytest.approx(-(math.log(0.1) + math.log(0.2)) / 2, rel=1e-5)


def test_activation_rms_is_the_rms_of_the_residual_stream_after_each_block():
    ctx = context()
    LayerStatsProbe().on_probe(None, ctx)
    # The stream is the embedding [i + 1, 0]: values 1 2 3 / 4 3 2 in one coordinate, 0 in the other.
    expected = math.sqrt((1 + 4 + 9 + 16 + 9 + 4) / 12)  # ~1.89
    assert ctx.values["act_rms/layers.0"] == pytest.approx(expected, rel=1e-5)
    assert ctx.values["act_rms/layers.1"] == pytest.approx(expected, rel=1e-5)


def test_attention_entropy_is_the_mean_entropy_of_uniform_causal_attention():
    ctx = context()
    LayerStatsProbe().on_probe(None, ctx)
    expected = (math.log(1) + math.log(2) + math.log(3)) / 3  # positions 0, 1, 2 see 1, 2, 3 keys
    assert ctx.values["attn_entropy/layers.0"] == pytest.approx(expected, rel=1e-5)
    assert ctx.values["attn_entropy/layers.1"] == pytest.approx(expected, rel=1e-5)


def test_dead_unit_fraction_counts_units_below_the_ratio_of_the_layer_mean():
    ctx = context()
    LayerStatsProbe().on_probe(None, ctx)
    silu = math.sqrt(2) / (1 + math.exp(-math.sqrt(2)))  # silu(sqrt 2): the gate of every unit
    for layer, expected in ((0, 0.5), (1, 0.25)):
        act = [abs(silu * math.sqrt(2) * u) for u in UP[layer]]  # the same at every position
        dead = sum(a < RATIO * (sum(act) / len(act)) for a in act) / len(act)
        assert dead == expected  # layer 0: the 0.01 and 0 units; layer 1: the 0.001 unit
        assert ctx.values[f"dead_units/layers.{layer}"] == pytest.approx(expected)


def test_rare_token_ratio_compares_predicted_and_baseline_mass_of_the_rarest_tokens():
    ctx = context()
    RareTokenProbe(4, 0.5, baseline=np.array([50.0, 30.0, 15.0, 5.0])).on_probe(None, ctx)
    # The rarest half: tokens 3 (5%) and 2 (15%): data mass 0.2, predicted 0.4 + 0.3.
    assert ctx.values["rare_mass_data"] == pytest.approx(0.2)
    assert ctx.values["rare_mass_pred"] == pytest.approx(0.7, rel=1e-5)
    assert ctx.values["rare_mass_ratio"] == pytest.approx(3.5, rel=1e-5)


def test_rare_tokens_without_a_baseline_come_from_the_labels_trained_on_and_skip_absent_tokens():
    probe = RareTokenProbe(4, 0.5)
    probe.on_batch(None, {"labels": torch.tensor([[1, 1, 1], [2, 2, 3]])}, step=1)  # counts 0 3 2 1
    ctx = context()
    probe.on_probe(None, ctx)
    # Token 0 never occurs: absent, not rare. Of the 3 present, the rarest int(0.5 * 3) = 1 is token 3.
    assert ctx.values["rare_mass_data"] == pytest.approx(1 / 6)
    assert ctx.values["rare_mass_pred"] == pytest.approx(0.4, rel=1e-5)
    assert ctx.values["rare_mass_ratio"] == pytest.approx(0.4 * 6, rel=1e-5)


def test_token_drift_measures_only_the_tokens_since_the_last_probe():
    baseline = [1.0, 1.0, 1.0, 1.0]
    probe = TokenDriftProbe(4, baseline=np.array(baseline))
    windows = [([[0, 0, 1], [2, 0, 1]], [3, 2, 1, 0]), ([[3, 3, 3], [3, 3, 2]], [0, 0, 1, 5])]
    for ids, counts in windows:
        probe.on_batch(None, {"input_ids": torch.tensor(ids)}, step=1)
        ctx = context()
        probe.on_probe(None, ctx)
        assert ctx.values["token_kl"] == pytest.approx(kl(counts, baseline), rel=1e-6)
        assert ctx.values["token_js"] == pytest.approx(js(counts, baseline), rel=1e-6)
