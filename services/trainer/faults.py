"""Fault injection for drills of the closed loop (off unless configured).

Each fault fires once per run: the record of fired faults survives rollbacks and resumes,
so that recovering from a fault does not replay it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .config import FaultConfig


class FaultConfigError(ValueError):
    """A fault names something the model does not have."""


class FaultInjector:
    def __init__(self, cfg: FaultConfig) -> None:
        self.cfg = cfg
        self.fired: set[str] = set()

    @property
    def enabled(self) -> bool:
        c = self.cfg
        return any(s is not None for s in (c.lr_multiply_step, c.corrupt_batch_step, c.nan_param_step, c.slowdown_step))

    def _due(self, name: str, at: int | None, step: int) -> bool:
        if at is None or name in self.fired or step < at:
            return False
        self.fired.add(name)
        return True

    def lr_factor(self, step: int) -> float | None:
        """The LR multiplier to apply from this step on (once), or None."""
        if self._due("lr_multiply", self.cfg.lr_multiply_step, step):
            return self.cfg.lr_multiply_factor
        return None

    def slowdown(self, step: int) -> float:
        """How many times as long this step must take: `slowdown_factor` from `slowdown_step` on, else 1.

        Unlike the other faults it lasts: a rollback restores the model, not the machine.
        """
        at = self.cfg.slowdown_step
        if at is None or step < at:
            return 1.0
        self.fired.add("slowdown")
        return self.cfg.slowdown_factor

    def corrupt_batches(self, batches: list[dict[str, torch.Tensor]], step: int, vocab_size: int
                        ) -> list[dict[str, torch.Tensor]] | None:
        """Copies of the step's micro-batches with uniform-noise tokens (deterministic per step), or None."""
        if not self._due("corrupt_batch", self.cfg.corrupt_batch_step, step):
            return None
        out = []
        for i, batch in enumerate(batches):
            g = torch.Generator().manual_seed(1_000_003 * step + 17 + i)
            noisy = dict(batch)
            noisy["input_ids"] = torch.randint(0, vocab_size, batch["input_ids"].shape, generator=g)
            noisy["labels"] = torch.randint(0, vocab_size, batch["labels"].shape, generator=g)
            out.append(noisy)
        return out

    def poison(self, model: nn.Module, step: int) -> str | None:
        """Write a NaN into one parameter; returns its name, or None when not due."""
        if not self._due("nan_param", self.cfg.nan_param_step, step):
            return None
        params = dict(model.named_parameters())
        name = self.cfg.nan_param_name or next((n for n in params if "mlp" in n and n.endswith("weight")), next(iter(params)))
        if name not in params:
            raise FaultConfigError(f"faults.nan_param_name {name!r} is not a parameter; e.g. {next(iter(params))!r}")
        with torch.no_grad():
            p = params[name]
            local = p.to_local() if hasattr(p, "to_local") else p
            if local.numel():
                local.view(-1)[0] = float("nan")
        return name

    def state_dict(self) -> dict[str, Any]:
        return {"fired": sorted(self.fired)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fired = set(state.get("fired", []))
