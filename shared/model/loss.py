"""The output head and the training loss in one pass: weighted cross-entropy from hidden states.

`linear_cross_entropy(hidden, weight, labels, token_weight)` is

    logits = hidden @ weight.T                       # [N, V]
    tok = cross_entropy(logits, labels, reduction="none")
    objective = sum(token_weight * tok) + z_loss * sum(token_weight * logsumexp(logits)^2)

computed a block of rows at a time: each block's logits are made, turned into the block's loss
and into its gradient (softmax - one-hot, times the token's weight), and used for the block's
input gradient and its share of the weight gradient, while they are still in cache. The full
[N, V] logits, their log-softmax and its gradient are never written to memory, and the
backward has nothing left to do but scale the two saved gradients by the incoming one.

Why not `torch.nn.functional.linear_cross_entropy`: its chunked path (torch 2.13) precomputes
gradients only for a scalar "sum"/"mean" reduction, which cannot weight tokens (the loss mask,
RAG context weights); with reduction="none" it recomputes every block in the backward, and
measured 0.33x the speed of the unfused head + F.cross_entropy on 10m's head (2048 x 256 ->
8192, 2 CPU threads). This one measured 1.3x on the demo's head (2048 x 128 -> 4096) and about
even (0.97-1.3x, run to run) on 10m's; `benchmarks/trainer.py` prints all three.

The trainer uses it on the fp32 path (no autocast): per-token losses come back for its
statistics, computed from the same logits. Higher-order gradients are not supported.
"""

from __future__ import annotations

import torch

BLOCK_LOGITS = 1 << 21
"""Logits per block (8 MiB of fp32): 512 rows of a 4096-token head, 256 of an 8192-token one, the
fastest measured on this machine's CPUs for both (benchmarks/trainer.py times the head)."""


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weight, z_loss: float, block: int):
        N = hidden.size(0)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.empty_like(weight)
        # [C, V] contiguous: the block's logits GEMM measured ~10% faster than through weight.T's
        # strides (256 x 256 -> 8192 on 2 CPU threads); one 8 MiB copy a step buys it back 8 times over.
        weight_t = weight.t().contiguous()
        tok = torch.empty(N, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
        # One [block, V] buffer for every block's logits, log-probabilities and gradient, in place:
        # fresh 8 MiB tensors each block measured ~1.5% of a 10m step slower (new pages, colder cache).
        buffer = hidden.new_empty(min(block, N), weight.size(0))
        for s in range(0, N, block):
            e = min(s + block, N)
            h, y, w = hidden[s:e], labels[s:e], token_weight[s:e]
            logits = torch.mm(h, weight_t, out=buffer[:e - s])  # [n, V]
            target = logits.gather(1, y[:, None]).squeeze(1)  # [n]
            # One fused pass, in place on CPU: its kernel reads a row (max, sum of exp) before it writes
            # each element from the same element (tests/shared/test_loss.py holds it to F.cross_entropy).
            logp = (torch.ops.aten._log_softmax.out(logits, -1, False, out=logits) if logits.device.type == "cpu"
                    else torch.log_softmax(logits, dim=-1))
            block_tok = logp.gather(1, y[:, None]).squeeze(1).neg_()
            tok[s:e] = block_tok
            block_lse = target + block_tok  # logsumexp = logit[y] - log p[y]
            lse[s:e] = block_lse
            # d objective / d logits = w * (1 + 2 z lse) * softmax - w * onehot(y)
            probs = logp.exp_()
            probs.mul_((w * (1 + 2 * z_loss * block_lse) if z_loss else w)[:, None])
            probs.scatter_add_(1, y[:, None], -w[:, None].to(probs.dtype))
            torch.mm(probs, weight, out=grad_hidden[s:e])
            if s == 0:  # the first block writes the weight gradient, the others add to it
                torch.mm(probs.T, h, out=grad_weight)
            else:
                grad_weight.addmm_(probs.T, h)
        objective = torch.dot(tok, token_weight)
        if z_loss:
            objective = objective + z_loss * torch.dot(lse.square(), token_weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(tok, lse)
        return objective, tok, lse

    @staticmethod
    def backward(ctx, grad_objective, _grad_tok, _grad_lse):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_objective.device.type == "cpu" and grad_objective.item() == 1.0:
            # The usual case (backward() of the objective itself): no need to scale two full tensors.
            # Handing out the saved tensors is safe: autograd writes into a gradient in place only
            # when nothing else holds it, and ctx does until the graph is freed (a retained graph's
            # second backward adds the same gradients again; tests/shared/test_loss.py checks it).
            return grad_hidden, grad_weight, None, None, None, None
        return grad_hidden * grad_objective, grad_weight * grad_objective, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, token_weight: torch.Tensor, *,
    z_loss: float = 0.0, block_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(objective, per-token loss, per-token logsumexp) of the head `weight` [V, C] on `hidden` [N, C].

    labels [N] int64 in [0, V); token_weight [N] fp32 (0 for a token that does not count).
    Only the objective carries a gradient. All of fp32: the caller keeps autocast off.
    block_rows: rows per block (default: BLOCK_LOGITS // V, at least 16).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.size(1) != weight.size(1):
        raise ValueError(f"hidden [N, C] and weight [V, C] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1] or token_weight.shape != hidden.shape[:1]:
        raise ValueError(f"labels and token_weight must be [N] = [{hidden.size(0)}], got "
                         f"{tuple(labels.shape)} and {tuple(token_weight.shape)}")
    if hidden.dtype != torch.float32 or weight.dtype != torch.float32:
        raise ValueError(f"fp32 hidden states and weight expected, got {hidden.dtype} and {weight.dtype}")
    block = block_rows or max(16, BLOCK_LOGITS // weight.size(0))
    return _LinearCrossEntropy.apply(hidden, weight, labels, token_weight.to(torch.float32), float(z_loss), int(block))
