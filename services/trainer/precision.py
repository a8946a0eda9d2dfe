"""Compute precision per device: fp32 on CPU, bf16 autocast where supported, fp16 + GradScaler elsewhere."""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch

Mode = Literal["fp32", "bf16", "fp16"]


class PrecisionError(ValueError):
    """A precision the device cannot (or should not) run."""


def resolve_precision(requested: str, device: torch.device) -> Mode:
    """'auto' -> fp32 on CPU, bf16 on GPUs that support it, else fp16."""
    if device.type == "cpu":
        if requested in ("bf16", "fp16"):
            raise PrecisionError(
                f"precision {requested!r} on CPU: autocast to low precision is ~30x slower than fp32 on these CPUs; "
                "set precision: fp32 (or auto)"
            )
        return "fp32"
    if requested != "auto":
        if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise PrecisionError("this GPU does not support bf16; use precision: fp16 (with loss scaling) or auto")
        return requested  # type: ignore[return-value]
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


class Precision:
    """Autocast context and, for fp16, a GradScaler; the parameters stay fp32 throughout."""

    def __init__(self, mode: Mode, device: torch.device) -> None:
        self.mode, self.device = mode, device
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.mode == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply the update (the caller has already refused non-finite gradients)."""
        if self.scaler is not None:
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    def update(self) -> None:
        """After every step, applied or skipped: the scaler backs off on overflow, grows otherwise."""
        if self.scaler is not None:
            self.scaler.update()

    @property
    def loss_scale(self) -> float | None:
        return float(self.scaler.get_scale()) if self.scaler is not None else None

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
