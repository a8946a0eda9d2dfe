"""Held-out metrics: per-domain loss/ppl/bpb, consistency with a direct computation, token cap."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from services.evaluator.heldout import LN2, dataset_tokenizer, heldout_metrics, sample_sequences
from shared.data.dataset import open_streams
from shared.data.manifest import load_manifest


def test_every_domain_gets_loss_ppl_and_bits_per_byte(trained, dataset):
    res = heldout_metrics(trained, dataset, batch_size=8, seq_len=128)
    manifest = load_manifest(dataset)
    assert sorted(res.domains) == ["code", "prose"]
    for name, d in res.domains.items():
        # every validation token but the domain's first is a label exactly once
        assert d.tokens == manifest.domains[name].val_tokens - 1
        assert d.ppl == pytest.approx(math.exp(d.loss))
        assert d.bits_per_byte == pytest.approx(d.nll / LN2 / d.bytes)
        assert d.doc_tokens.sum() == d.tokens
        assert d.doc_nll.sum() == pytest.approx(d.nll)
        assert d.doc_bytes.sum() == d.bytes
        assert d.doc_nll.size == manifest.domains[name].val_documents
        assert 0 < d.loss < math.log(trained.config.vocab_size) + 1
    m = res.metrics()
    assert m["val_ppl"] == pytest.approx(math.exp(m["val_loss"]))
    assert m["val_loss"] == pytest.approx(sum(d.nll for d in res.domains.values()) / res.tokens)
    assert m["val_tokens_per_s"] > 0
    assert res.domain_metrics()["code"]["ppl"] == pytest.approx(res.domains["code"].ppl)


def test_loss_matches_a_direct_computation_and_the_decoded_bytes(trained, dataset):
    res = heldout_metrics(trained, dataset, batch_size=4, seq_len=64, domains=["code"])
    _, streams = open_streams(dataset, "val")
    tokens = torch.from_numpy(streams["code"].read(0, streams["code"].tokens))
    # one long forward in chunks of 64 (the same windows), computed independently
    nll = 0.0
    with torch.no_grad():
        for lo in range(0, tokens.numel() - 1, 64):
            chunk = tokens[lo:lo + 65]
            logits = trained(chunk[None, :-1])
            nll += F.cross_entropy(logits[0], chunk[1:], reduction="sum").item()
    assert res.domains["code"].nll == pytest.approx(nll, rel=1e-5)
    sp = dataset_tokenizer(dataset)
    ids = tokens[1:].tolist()
    docs, cur = [], []
    for t in ids:
        if t == 3:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    assert res.domains["code"].bytes == sum(len(sp.decode(d).encode("utf-8")) for d in docs)


def test_batch_size_does_not_change_the_result(trained, dataset):
    a = heldout_metrics(trained, dataset, batch_size=1, seq_len=128, max_tokens=2000)
    b = heldout_metrics(trained, dataset, batch_size=16, seq_len=128, max_tokens=2000)
    for name in a.domains:
        np.testing.assert_allclose(a.domains[name].doc_nll, b.domains[name].doc_nll, rtol=1e-5)


def test_max_tokens_caps_each_domain(trained, dataset):
    res = heldout_metrics(trained, dataset, batch_size=8, seq_len=128, max_tokens=1000)
    assert {d.tokens for d in res.domains.values()} == {1000}
    assert all(d.doc_tokens.sum() == 1000 for d in res.domains.values())


def test_unknown_domain_is_refused(trained, dataset):
    with pytest.raises(ValueError, match="no val tokens"):
        heldout_metrics(trained, dataset, domains=["poetry"])


def test_sample_sequences_are_full_validation_windows(dataset):
    ids = sample_sequences(dataset, 4, 32)
    assert ids.shape == (4, 32)
    assert (ids != 0).all()  # no padding
