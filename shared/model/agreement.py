"""Top-1 agreement between a reference model's logits and another runtime's, counted where the
reference decided.

Over every position, agreement measures the model's indecision as much as the other runtime's
error: any perturbation, however small, flips the argmax of a near-tie, and a small model has many
(a demo model at ~2 bits/byte puts its top two tokens within 5% probability at over a third of its
positions). A flip at a position where the reference's top-1 leads its runner-up by at least
`margin` nats of log-probability changes a choice the reference actually made. Used by the
evaluator's int8 check and the exporter's llama.cpp (GGUF) check.
"""

from __future__ import annotations

from typing import Any

import torch


def decided_agreement(ref: Any, other: Any, margin: float) -> dict[str, float | int | None]:
    """Top-1 agreement of `other` with `ref` (logits [..., V], tensors or arrays) at the positions
    where ref's top-1 leads its runner-up by at least `margin` nats of log-probability (None when
    there is none), with the count and fraction of those positions and the agreement over every
    position (`top1_agreement_all`). `margin` 0 counts every position."""
    ref, other = torch.as_tensor(ref).float(), torch.as_tensor(other).float()
    if ref.shape != other.shape:
        raise ValueError(f"logits of shape {tuple(other.shape)} compared with reference {tuple(ref.shape)}")
    same = ref.argmax(-1) == other.argmax(-1)
    top2 = ref.log_softmax(-1).topk(2, dim=-1).values
    decided = (top2[..., 0] - top2[..., 1]) >= margin
    n = int(decided.sum())
    return {"top1_agreement": float(same[decided].float().mean()) if n else None, "decided_margin": margin,
            "decided_positions": n, "decided_fraction": n / same.numel(),
            "top1_agreement_all": float(same.float().mean())}
