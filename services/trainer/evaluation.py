"""Validation inside the training loop: the mean masked loss over the same micro-batches every time.

    Evaluator(cfg.eval, val_data, model, ...).maybe_evaluate(step) -> float | None
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import EvalConfig
from .data import BatchSource
from .distributed import DistContext


class Evaluator:
    """Every `eval.every` steps (when there is validation data): `eval.batches` micro-batches from the start."""

    def __init__(self, cfg: EvalConfig, data: BatchSource | None, model: nn.Module, ctx: DistContext, *,
                 autocast: Callable[[], Any]) -> None:
        self.cfg, self.data, self.model, self.ctx, self.autocast = cfg, data, model, ctx, autocast
        self._initial = data.state_dict() if data is not None else None  # rewound to before every evaluation

    def due(self, step: int) -> bool:
        return bool(self.cfg.every) and self.data is not None and step % self.cfg.every == 0

    @torch.no_grad()
    def evaluate(self) -> float:
        """Collective under torchrun: every rank evaluates its share and the sums are reduced."""
        if self.data is None:
            raise ValueError("evaluate() needs a val_data batch source; pass val_data to the Trainer")
        self.data.load_state_dict(self._initial)
        device = self.ctx.device
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)  # masked loss sum, token count
        try:
            for _ in range(self.cfg.batches):
                b = next(self.data)
                ids, labels = b["input_ids"].to(device), b["labels"].to(device)
                mask = (b["loss_mask"].float().to(device) if "loss_mask" in b
                        else torch.ones_like(labels, dtype=torch.float32))
                with self.autocast():
                    logits = self.model(ids)  # FSDP2 shards in place: its hooks still gather the weights
                tok = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
                total[0] += (tok * mask).sum().double()
                total[1] += mask.sum().double()
        finally:
            self.model.train()
        self.ctx.all_reduce_sum(total)
        return float(total[0] / total[1].clamp_min(1))
