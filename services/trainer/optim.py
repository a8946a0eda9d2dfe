"""The optimizer (AdamW, or Muon + AdamW) and the warmup + cosine learning-rate schedule.

`build_optimizer` is the one place an optimizer is made: AdamW (fused where the device has a
kernel; ZeroRedundancyOptimizer-sharded on DDP + zero), or, with `optim.name: muon`, Muon for
the 2-D hidden matrices and AdamW for embeddings, head and norms (as modded-nanogpt and
nanochat do), stepped together as `MuonWithAdamW`. Muon is `torch.optim.Muon` with its
orthogonalisation batched (`services.trainer.muon.BatchedMuon`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, MutableMapping
from typing import Any

import torch
import torch.nn as nn

from .config import OptimConfig
from .muon import BatchedMuon, run_closure

LR_RATIO = "lr_ratio"
"""Param-group key: the group's LR over the schedule's (Muon's lr / optim.lr); 1 when absent."""


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


def muon_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices for Muon, everything else for AdamW), each in named_parameters order.

    Embedding tables and the output head are 2-D but are not hidden transforms: AdamW takes
    them, with the 1-D gains (a tied head is the embedding, once).
    """
    outer: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            outer.add(id(module.weight))
    head = getattr(model, "lm_head", None)
    if head is not None:
        outer.add(id(head.weight))
    hidden, rest = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (hidden if p.dim() == 2 and id(p) not in outer else rest).append(p)
    return hidden, rest


class _JoinedState(MutableMapping):
    """The optimizers' `state` dicts as one mapping (their parameters are disjoint)."""

    def __init__(self, optimizers: tuple[torch.optim.Optimizer, ...]) -> None:
        self._optimizers = optimizers

    def _owner(self, key: Any) -> dict:
        for opt in self._optimizers:
            if key in opt.state:
                return opt.state
        raise KeyError(key)

    def __getitem__(self, key: Any) -> Any:
        return self._owner(key)[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        raise TypeError("set optimizer state through the optimizer that owns the parameter")

    def __delitem__(self, key: Any) -> None:
        del self._owner(key)[key]

    def __iter__(self) -> Iterator[Any]:
        for opt in self._optimizers:
            yield from opt.state

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._optimizers)

    def clear(self) -> None:
        for opt in self._optimizers:
            opt.state.clear()


class MuonWithAdamW:
    """Muon over the hidden matrices and AdamW over the rest, stepped as one optimizer.

    `param_groups` lists AdamW's groups then Muon's (the same dicts: setting an LR on them sets
    it on the optimizer); `optimizers` are the two, for torch.distributed.checkpoint's
    get_state_dict / set_state_dict, which merge and split their states by parameter name.
    """

    def __init__(self, adamw: torch.optim.Optimizer, muon: torch.optim.Optimizer) -> None:
        self.adamw, self.muon = adamw, muon
        self.optimizers = (adamw, muon)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> _JoinedState:
        return _JoinedState(self.optimizers)

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])


def optimizers_of(optimizer: Any) -> Any:
    """What torch.distributed.checkpoint takes: the two optimizers of a MuonWithAdamW, else itself."""
    return optimizer.optimizers if isinstance(optimizer, MuonWithAdamW) else optimizer


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device, *, zero: bool = False
                    ) -> torch.optim.Optimizer | MuonWithAdamW:
    """The run's optimizer over the parameters of `model` (the plain module: not a DDP wrapper).

    AdamW: matrices decayed, gains not; `zero` shards it with ZeroRedundancyOptimizer (DDP).
    Muon (`cfg.name == "muon"`): `MuonWithAdamW`; its groups carry `lr_ratio` = muon.lr / lr,
    so that one schedule drives both (`set_lr`).
    """
    kw = optimizer_kwargs(cfg, device)
    if cfg.name == "muon":
        if zero:
            raise ValueError("optim.name 'muon' does not run with distributed.zero")
        hidden, rest = muon_split(model)
        decay = [p for p in rest if p.dim() >= 2]
        gains = [p for p in rest if p.dim() < 2]
        adamw = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": gains, "weight_decay": 0.0}], **kw)
        m = cfg.muon
        muon = BatchedMuon(
            hidden, lr=m.lr, momentum=m.momentum, nesterov=m.nesterov, ns_steps=m.ns_steps,
            weight_decay=cfg.weight_decay if m.weight_decay is None else m.weight_decay, adjust_lr_fn=m.adjust_lr_fn,
        )
        for group in muon.param_groups:
            group[LR_RATIO] = m.lr / cfg.lr
        return MuonWithAdamW(adamw, muon)
    groups = param_groups(model, cfg.weight_decay)
    if zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=torch.optim.AdamW,
                                      weight_decay=groups[0]["weight_decay"], **kw)
        opt.add_param_group(groups[1])
        return opt
    return torch.optim.AdamW(groups, **kw)


class LRSchedule:
    """lr(step) = peak * factor(step): linear warmup from 0, then cosine down to min_lr_ratio (or
    constant, or wsd: the peak, then a linear cooldown to min_lr_ratio over the last cooldown_fraction).

    A pure function of the step: nothing to checkpoint. `step` is the 1-based index of the
    optimizer step about to run.
    """

    def __init__(self, cfg: OptimConfig, max_steps: int) -> None:
        self.peak = cfg.lr
        self.warmup = cfg.warmup_steps
        self.decay_steps = cfg.decay_steps or max_steps
        self.min_ratio = cfg.min_lr_ratio
        self.kind = cfg.schedule
        self.cooldown = cfg.cooldown_fraction

    def factor(self, step: int) -> float:
        if self.warmup and step <= self.warmup:
            return step / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "wsd":
            # Linear from the peak at `start` to min_ratio at decay_steps (Hagele et al. 2024; modded-nanogpt).
            start = max(self.decay_steps * (1.0 - self.cooldown), self.warmup)
            progress = min(max(step - start, 0) / max(self.decay_steps - start, 1), 1.0)
            return 1.0 - (1.0 - self.min_ratio) * progress
        span = max(self.decay_steps - self.warmup, 1)
        progress = min(max(step - self.warmup, 0) / span, 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        return self.peak * self.factor(step)


def set_lr(optimizer: torch.optim.Optimizer | MuonWithAdamW, lr: float) -> None:
    """The step's LR on every group, times the group's `lr_ratio` (Muon's scale keeps its ratio)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get(LR_RATIO, 1.0)
