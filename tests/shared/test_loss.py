"""shared.model.loss.linear_cross_entropy against the plain head + F.cross_entropy, and by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from shared.model.loss import linear_cross_entropy


def _inputs(N=37, C=8, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g, dtype=torch.float64).float()
    weight = torch.randn(V, C, generator=g).mul_(0.5)
    labels = torch.randint(0, V, (N,), generator=g)
    w = torch.rand(N, generator=g)
    w[::5] = 0.0  # masked tokens
    return hidden, weight, labels, w


def test_a_hand_computed_token():
    """Two classes, one token: loss = logsumexp(logits) - logit[y]; gradient = w * (softmax - onehot) x."""
    h = torch.tensor([[1.0, 2.0]], requires_grad=True)
    W = torch.tensor([[0.5, 0.0], [0.0, -1.0]], requires_grad=True)  # logits (0.5, -2.0)
    obj, tok, lse = linear_cross_entropy(h, W, torch.tensor([1]), torch.tensor([0.5]))
    expect_lse = math.log(math.exp(0.5) + math.exp(-2.0))
    assert float(lse[0]) == pytest.approx(expect_lse, abs=1e-6)
    assert float(tok[0]) == pytest.approx(expect_lse + 2.0, abs=1e-6)
    assert float(obj.detach()) == pytest.approx(0.5 * (expect_lse + 2.0), abs=1e-6)
    obj.backward()
    p1 = math.exp(-2.0 - expect_lse)
    d = torch.tensor([0.5 * (1 - p1), 0.5 * (p1 - 1)])  # d obj / d logits
    torch.testing.assert_close(W.grad, torch.outer(d, torch.tensor([1.0, 2.0])))
    torch.testing.assert_close(h.grad, (d @ W.detach())[None])


@pytest.mark.parametrize("block", [1, 5, 16, 64])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_matches_the_unfused_head_and_loss(block, z_loss):
    """Objective, per-token losses and both gradients as logits -> F.cross_entropy (+ z-loss) give,
    for blocks that divide N, do not, and exceed it; the backward scales by the incoming gradient."""
    hidden, weight, labels, w = _inputs()
    h1, W1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = h1 @ W1.T
    tok_ref = F.cross_entropy(logits, labels, reduction="none")
    obj_ref = (tok_ref * w).sum() + z_loss * (torch.logsumexp(logits, -1).square() * w).sum()
    (obj_ref * 3.0).backward()

    h2, W2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    obj, tok, lse = linear_cross_entropy(h2, W2, labels, w, z_loss=z_loss, block_rows=block)
    (obj * 3.0).backward()
    torch.testing.assert_close(obj, obj_ref)
    torch.testing.assert_close(tok, tok_ref.detach())
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1).detach())
    torch.testing.assert_close(h2.grad, h1.grad)
    torch.testing.assert_close(W2.grad, W1.grad)
    assert not tok.requires_grad and not lse.requires_grad
    assert h2.grad[::5].abs().max() == 0  # a masked token gets no gradient


def test_a_tied_head_accumulates_both_gradients():
    """The head is the embedding: its gradient is the embedding's plus the head's, as autograd adds them."""
    hidden, weight, labels, w = _inputs()
    emb = weight.clone().requires_grad_()
    ids = torch.arange(hidden.size(0)) % weight.size(0)
    x = emb[ids] + hidden
    obj, _, _ = linear_cross_entropy(x, emb, labels, w, block_rows=7)
    obj.backward()
    emb_ref = weight.clone().requires_grad_()
    x_ref = emb_ref[ids] + hidden
    (F.cross_entropy(x_ref @ emb_ref.T, labels, reduction="none") * w).sum().backward()
    torch.testing.assert_close(emb.grad, emb_ref.grad)


def test_bad_shapes_and_dtypes_are_refused_naming_them():
    hidden, weight, labels, w = _inputs()
    with pytest.raises(ValueError, match=r"weight \[V, C\]"):
        linear_cross_entropy(hidden, weight[:, :3], labels, w)
    with pytest.raises(ValueError, match="token_weight"):
        linear_cross_entropy(hidden, weight, labels, w[:3])
    with pytest.raises(ValueError, match="fp32"):
        linear_cross_entropy(hidden.double(), weight.double(), labels, w)


def test_losses_far_beyond_fp32_probabilities_stay_exact_and_finite():
    """Labels 100 nats (p[y] a denormal: -log p[y] would be 99.98) and 1000 nats (p[y] = 0: -log p[y]
    would be inf) below the top logit: the loss is still logsumexp - logit[y], and the gradient
    the softmax minus the one-hot."""
    h = torch.ones(3, 1, requires_grad=True)
    W = torch.tensor([[0.0], [900.0], [1000.0]], requires_grad=True)  # logits (0, 900, 1000) on every row
    labels = torch.tensor([0, 1, 2])
    obj, tok, lse = linear_cross_entropy(h, W, labels, torch.ones(3))
    logits = torch.tensor([0.0, 900.0, 1000.0], dtype=torch.float64)
    expect_lse = float(torch.logsumexp(logits, 0))  # 1000 + log(1 + e^-100 + e^-1000)
    torch.testing.assert_close(tok, torch.tensor([expect_lse, expect_lse - 900.0, expect_lse - 1000.0]))
    torch.testing.assert_close(lse, torch.full((3,), expect_lse))
    assert math.isfinite(float(obj.detach()))
    obj.backward()
    d = 3 * torch.softmax(logits, 0).float() - 1  # three rows, weight 1: softmax each, one-hot once per class
    torch.testing.assert_close(W.grad[:, 0], d)


def test_a_retained_graph_backs_up_twice_into_untouched_saved_gradients():
    """The backward hands out its saved gradients unscaled when the incoming gradient is 1: a second
    backward of a retained graph must add the same gradients again (the tied head included)."""
    hidden, weight, labels, w = _inputs()
    emb = torch.nn.Embedding(*weight.shape)
    with torch.no_grad():
        emb.weight.copy_(weight)
    ids = torch.randint(0, weight.size(0), (hidden.size(0),), generator=torch.Generator().manual_seed(1))
    x = emb(ids) + hidden  # the embedding is also the head: two gradients meet in one tensor
    obj, _, _ = linear_cross_entropy(x, emb.weight, labels, w)
    obj.backward(retain_graph=True)
    once = emb.weight.grad.clone()
    obj.backward()
    torch.testing.assert_close(emb.weight.grad, 2 * once)
