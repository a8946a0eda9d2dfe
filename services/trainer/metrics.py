"""Throughput, MFU, and the metric emitters (callbacks on the `log` event).

The bus emitter (a TrainingMetrics event through the outbox) lives with the service
wiring; here are the structured-log emitter and the Weights & Biases emitter.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from shared.logging import get_logger

from .config import WandbConfig
from .hooks import Callback

# Dense peak FLOP/s by device name fragment and precision (vendor datasheets, no sparsity).
_GPU_PEAK: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # SXM; PCIe is ~756e12
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
    ("V100", {"bf16": 0.0, "fp16": 125e12, "fp32": 15.7e12}),
    ("T4", {"bf16": 0.0, "fp16": 65e12, "fp32": 8.1e12}),
]
CPU_PEAK_PER_CORE_FALLBACK = 50e9


def cpu_peak_flops_per_core() -> float:
    """fp32 peak of one x86 core from /proc/cpuinfo: FMA lanes x 2 units x 2 FLOPs x clock.

    AVX-512: 64 FLOP/cycle, AVX2+FMA: 32, else 16; an estimate (turbo and the number of FMA
    units vary by part): set TrainConfig.peak_flops for a figure you trust.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return CPU_PEAK_PER_CORE_FALLBACK
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    mhz = next((float(line.split(":", 1)[1]) for line in text.splitlines() if line.startswith("cpu MHz")), 0.0)
    if not mhz:
        return CPU_PEAK_PER_CORE_FALLBACK
    per_cycle = 64 if "avx512f" in flags else 32 if ("avx2" in flags and "fma" in flags) else 16
    return per_cycle * mhz * 1e6


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s per device for MFU; None when unknown (set TrainConfig.peak_flops)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peaks in _GPU_PEAK:
            if fragment in name:
                return peaks.get(precision) or None
        return None
    if device.type == "cpu":
        return cpu_peak_flops_per_core() * torch.get_num_threads()
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None, world_size: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak of all devices."""
    if not peak_flops or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_per_token / (peak_flops * world_size)


class Throughput:
    """Tokens/s between two `log` points."""

    def __init__(self) -> None:
        self._t = time.perf_counter()
        self._tokens = 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def pause(self) -> None:
        """Exclude time spent outside training (eval, pause) from the next rate."""
        self._paused_at = time.perf_counter()

    def resume(self) -> None:
        paused_at = getattr(self, "_paused_at", None)
        if paused_at is not None:
            self._t += time.perf_counter() - paused_at
            self._paused_at = None

    def rate(self) -> float:
        now = time.perf_counter()
        dt = now - self._t
        r = self._tokens / dt if dt > 0 else 0.0
        self._t, self._tokens = now, 0
        return r


def finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


class StructlogEmitter(Callback):
    """One `train.metrics` log line per log interval (per-layer/probe dicts flattened)."""

    observer = True

    def __init__(self, logger: Any | None = None, event: str = "train.metrics") -> None:
        self.log = logger or get_logger("helox.trainer")
        self.event = event

    def on_log(self, trainer, metrics: dict[str, Any]) -> None:
        flat: dict[str, Any] = {}
        for k, v in metrics.items():
            if isinstance(v, dict):
                flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                flat[k] = v
        self.log.info(self.event, **flat)


class FunctionEmitter(Callback):
    """Calls fn(metrics) every log interval: the hook for the bus outbox and for tests."""

    observer = True

    def __init__(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self.fn = fn

    def on_log(self, trainer, metrics: dict[str, Any]) -> None:
        self.fn(metrics)


class WandbEmitter(Callback):
    """Weights & Biases: offline by default (files under out_dir/wandb), online when configured."""

    observer = True

    def __init__(self, cfg: WandbConfig, out_dir: str | os.PathLike[str], run_config: dict[str, Any] | None = None,
                 run_id: str | None = None) -> None:
        self.cfg, self.out_dir, self.run_config, self.run_id = cfg, Path(out_dir), run_config, run_id
        self._run = None

    def _ensure_run(self):
        if self._run is None:
            import wandb  # imported lazily: it is slow to import and optional at run time

            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._run = wandb.init(
                project=self.cfg.project, entity=self.cfg.entity, name=self.cfg.name, mode=self.cfg.mode,
                dir=str(self.out_dir), config=self.run_config, id=self.run_id, resume="allow" if self.run_id else None,
                # No system-metrics sampler: its thread took ~7% of the trainer's CPU samples.
                settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
            )
        return self._run

    def on_train_start(self, trainer, resumed_from: Any = None) -> None:
        # Before the first step: wandb.init takes seconds and starts threads; done lazily at the
        # first log it stalled a step (the dip the health monitor alerts on).
        self._ensure_run()

    def on_log(self, trainer, metrics: dict[str, Any]) -> None:
        flat: dict[str, float] = {}
        for k, v in metrics.items():
            if isinstance(v, dict):
                flat.update({f"{k}/{kk}": vv for kk, vv in v.items() if isinstance(vv, (int, float))})
            elif isinstance(v, (int, float)) and v is not None:
                flat[k] = v
        step = int(metrics.get("step", 0))
        self._ensure_run().log(flat, step=step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
