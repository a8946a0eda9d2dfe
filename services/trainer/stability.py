"""Gradient norms (global and per layer), clipping, adaptive clipping, non-finite step skipping."""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import StabilityConfig
from .control import Alert

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_group(name: str) -> str:
    """Parameter name -> reporting group: 'layers.3', 'embed_tokens', 'norm' or 'lm_head'."""
    m = _LAYER.search(name)
    if m:
        return f"layers.{m.group(1)}"
    name = name.removeprefix("module.").removeprefix("_orig_mod.")
    return name.split(".")[0]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this rank


class GradNorms:
    """Computes global and per-group gradient norms in one pass (one host sync).

    With FSDP the gradients are sharded DTensors: squared shard norms are summed over the
    process group before the square root, so every rank sees the full-model norms.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], *, sharded: bool = False) -> None:
        self.params = [p for _, p in named_params]
        groups = [layer_group(n) for n, _ in named_params]
        self.group_names = list(dict.fromkeys(groups))
        index = {g: i for i, g in enumerate(self.group_names)}
        self._group_idx = torch.tensor([index[g] for g in groups], dtype=torch.long)
        self.sharded = sharded

    def grads(self) -> list[torch.Tensor]:
        return [_local(p.grad) for p in self.params if p.grad is not None]

    def compute(self) -> tuple[float, dict[str, float]]:
        """(global norm, {group: norm}); inf/nan propagate so that the caller can refuse the step."""
        present = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not present:
            return 0.0, {}
        grads = [_local(self.params[i].grad) for i in present]
        device = grads[0].device
        norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])  # [P]
        sq = torch.zeros(len(self.group_names), device=device, dtype=torch.float32)
        sq.index_add_(0, self._group_idx[present].to(device), norms.square())  # [G]
        if self.sharded and dist.is_available() and dist.is_initialized():
            dist.all_reduce(sq)
        values = sq.tolist()
        total = math.sqrt(sum(values))  # nan or inf propagate
        return total, {g: math.sqrt(v) if v >= 0 else float("nan") for g, v in zip(self.group_names, values, strict=True)}

    def clip_(self, total_norm: float, max_norm: float) -> float:
        """Scale gradients so that the global norm is at most max_norm; returns the coefficient."""
        coef = max_norm / (total_norm + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_(self.grads(), coef)
        return min(coef, 1.0)


class AdaptiveClipper:
    """Threshold = mean + sigma * std over the last `window` finite norms, capped by clip_norm.

    Until `min_history` norms are seen the static clip_norm applies. The state is saved in
    checkpoints so that a resumed run clips exactly as the uninterrupted one.
    """

    def __init__(self, cfg: StabilityConfig) -> None:
        self.window, self.sigma, self.min_history = cfg.adaptive_window, cfg.adaptive_sigma, cfg.adaptive_min_history
        self.cap = cfg.clip_norm
        self.history: deque[float] = deque(maxlen=self.window)

    def threshold(self) -> float | None:
        if len(self.history) < self.min_history:
            return self.cap
        n = len(self.history)
        mean = sum(self.history) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / max(n - 1, 1))
        t = mean + self.sigma * std
        return min(t, self.cap) if self.cap is not None else t

    def observe(self, norm: float) -> None:
        if math.isfinite(norm):
            self.history.append(norm)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque(state.get("history", []), maxlen=self.window)


@dataclass
class StepVerdict:
    applied: bool
    grad_norm: float
    per_layer: dict[str, float]
    clip_threshold: float | None
    clip_coef: float
    reason: str = ""


@dataclass
class StabilityGuard:
    """Decides whether a step's gradients may be applied, clips them, and counts skips."""

    cfg: StabilityConfig
    norms: GradNorms
    skipped_steps: int = 0
    consecutive_skips: int = 0
    adaptive: AdaptiveClipper | None = field(default=None)

    def __post_init__(self) -> None:
        if self.cfg.adaptive_clip and self.adaptive is None:
            self.adaptive = AdaptiveClipper(self.cfg)

    def check_and_clip(self, loss: float) -> StepVerdict:
        total, per_layer = self.norms.compute()
        threshold = self.adaptive.threshold() if self.adaptive is not None else self.cfg.clip_norm
        if not (math.isfinite(total) and math.isfinite(loss)):
            self.skipped_steps += 1
            self.consecutive_skips += 1
            what = "gradient norm" if not math.isfinite(total) else "loss"
            return StepVerdict(False, total, per_layer, threshold, 0.0, f"non-finite {what}")
        self.consecutive_skips = 0
        coef = self.norms.clip_(total, threshold) if threshold is not None else 1.0
        if self.adaptive is not None:
            self.adaptive.observe(total)
        return StepVerdict(True, total, per_layer, threshold, coef)

    def non_finite_alert(self, step: int) -> Alert | None:
        """After `max_consecutive_skips` non-finite steps in a row, the loop's own alert (the control
        policy decides what to do, as for the health monitor's alerts); None otherwise."""
        n = self.consecutive_skips
        if n < self.cfg.max_consecutive_skips:
            return None
        self.consecutive_skips = 0
        return Alert("non_finite", "critical", step - n + 1, step, "rollback_cut_lr",
                     f"{n} consecutive non-finite steps (loop)")

    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "adaptive": self.adaptive.state_dict() if self.adaptive is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        if self.adaptive is not None and state.get("adaptive"):
            self.adaptive.load_state_dict(state["adaptive"])
