"""AdamW (fused where the device has a kernel) and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; leave gains (1-D: RMSNorm weights) undecayed. Order follows named_parameters."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def fused_available(device: torch.device) -> bool:
    # torch ships fused AdamW kernels for CUDA, CPU (>= 2.4), MPS and XPU.
    return device.type in ("cuda", "cpu", "mps", "xpu")


def optimizer_kwargs(cfg: OptimConfig, device: torch.device) -> dict:
    fused = fused_available(device) if cfg.fused is None else cfg.fused
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if fused:
        kw["fused"] = True
    else:
        kw["foreach"] = True
    return kw


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **optimizer_kwargs(cfg, device))


class LRSchedule:
    """lr(step) = peak * factor(step): linear warmup from 0, then cosine down to min_lr_ratio.

    A pure function of the step: nothing to checkpoint. `step` is the 1-based index of the
    optimizer step about to run.
    """

    def __init__(self, cfg: OptimConfig, max_steps: int) -> None:
        self.peak = cfg.lr
        self.warmup = cfg.warmup_steps
        self.decay_steps = cfg.decay_steps or max_steps
        self.min_ratio = cfg.min_lr_ratio
        self.kind = cfg.schedule

    def factor(self, step: int) -> float:
        if self.warmup and step <= self.warmup:
            return step / self.warmup
        if self.kind == "constant":
            return 1.0
        span = max(self.decay_steps - self.warmup, 1)
        progress = min(max(step - self.warmup, 0) / span, 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        return self.peak * self.factor(step)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
