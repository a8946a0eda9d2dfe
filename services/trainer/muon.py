"""`torch.optim.Muon` with its Newton-Schulz orthogonalisation batched, in fp32 on CPU.

The pinned torch's Muon orthogonalises one matrix at a time, and always in bfloat16 (the fast
path on a GPU). On a CPU, bf16 matmuls are emulated (~30x slower than fp32, see FACTS), and a
small model's matrices are many and tiny: on the demo model (2 blocks, d_model 128) Muon's step
was about a quarter of the whole training step. `BatchedMuon` keeps the library's algorithm,
arguments, param groups and state (`momentum_buffer`, so checkpoints load either way) and
changes only how the work is laid out:

- matrices of one shape (after putting the short side first, as the library does) are stacked
  and orthogonalised together: one `baddbmm` per term of the quintic instead of one per matrix;
- the iteration runs in fp32 on CPU and in bf16 elsewhere (the library's choice there);
- momentum, Nesterov, decoupled decay and the update are `torch._foreach_*` calls over the group.

The update is the library's: buf = lerp(buf, g, 1 - mu); u = lerp(g, buf, mu) with Nesterov;
p *= 1 - lr * wd; p -= adjusted_lr * NS(u). tests/trainer/test_optim.py checks it against
`torch.optim.Muon` step for step with the same (fp32) iteration.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor
from torch.optim._muon import _adjust_lr


def orthogonalize(updates: list[Tensor], coefficients: tuple[float, float, float], steps: int, eps: float
                  ) -> list[Tensor]:
    """The library's quintic Newton-Schulz iteration on each matrix, batched by shape.

    Each X (short side first) is scaled to Frobenius norm 1, then `steps` times
    A = X X^T; B = b A + c A A; X = a X + B X. Returns the results in the input order, each in
    its matrix's own orientation and dtype.
    """
    a, b, c = coefficients
    groups: dict[tuple[torch.Size, torch.device], list[int]] = defaultdict(list)
    for i, u in enumerate(updates):
        rows, cols = u.shape
        groups[(torch.Size((min(rows, cols), max(rows, cols))), u.device)].append(i)
    out: list[Tensor | None] = [None] * len(updates)
    for (_, device), idx in groups.items():
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        X = torch.stack([updates[i].T if updates[i].size(0) > updates[i].size(1) else updates[i] for i in idx])
        X = X.to(dtype)
        X = X / torch.linalg.matrix_norm(X, keepdim=True).clamp_(min=eps)  # [n, r, c]
        for _ in range(steps):
            A = torch.bmm(X, X.mT)  # [n, r, r]
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, B, X, beta=a)
        for i, x in zip(idx, X.unbind(0), strict=True):
            u = updates[i]
            out[i] = (x.T if u.size(0) > u.size(1) else x).to(u.dtype)
    return out  # type: ignore[return-value]


def run_closure(closure):
    """An optimizer step's closure, re-evaluating the loss with gradients on (None without one)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class BatchedMuon(torch.optim.Muon):
    """`torch.optim.Muon`, same constructor and state, with the step described in the module doc."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            bufs: list[Tensor] = []
            self._init_group(group, params, grads, bufs)
            if not params:
                continue
            lr = float(group["lr"])
            momentum = group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            ortho = orthogonalize(updates, group["ns_coefficients"], group["ns_steps"], group["eps"])
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            scaled = [o.mul_(-_adjust_lr(lr, group["adjust_lr_fn"], p.shape)) for p, o in zip(params, ortho, strict=True)]
            torch._foreach_add_(params, scaled)
        return loss
