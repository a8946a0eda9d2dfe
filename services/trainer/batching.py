"""Adaptive batch size: the largest micro-batch that fits (OOM back-off) and the gradient noise scale."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import NoiseScaleConfig


class MicroBatchTooLargeError(RuntimeError):
    """Not even one sequence per micro-batch fits on the device."""


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def find_micro_batch_size(trial: Callable[[int], None], start: int, *, empty_cache: Callable[[], None] | None = None) -> int:
    """Largest size <= start for which `trial(size)` (a forward+backward at full length) does not OOM.

    Halves on out-of-memory; the caller keeps the global batch by accumulating more micro-batches.
    """
    size = start
    while size >= 1:
        try:
            trial(size)
            return size
        except Exception as exc:
            if not _is_oom(exc):
                raise
            if empty_cache is not None:
                empty_cache()
            size //= 2
    raise MicroBatchTooLargeError(
        "a micro-batch of 1 sequence does not fit in device memory; shorten batch.seq_len, "
        "use a smaller model, or shard it (distributed.strategy: fsdp, cpu_offload: true)"
    )


def auto_micro_batch_size(model: nn.Module, autocast: Callable[[], Any], per_rank: int, seq_len: int,
                          device: torch.device, *, all_ranks_min: Callable[[int], int] = lambda n: n) -> int:
    """`batch.micro_batch_size: auto`: the largest that fits on this GPU (8 at most elsewhere).

    all_ranks_min: the smallest over ranks, so that every rank runs the same micro-batch.
    """
    if device.type != "cuda":
        return max(1, min(per_rank, 8))
    vocab = model.config.vocab_size

    def trial(size: int) -> None:
        ids = torch.randint(0, vocab, (size, seq_len), device=device)
        with autocast():
            logits = model(ids)  # [B, T, V]
        F.cross_entropy(logits.float().flatten(0, 1), ids.flatten()).backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)

    return all_ranks_min(find_micro_batch_size(trial, per_rank, empty_cache=torch.cuda.empty_cache))


class NoiseScale:
    """Gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, appendix A.1).

    Unbiased estimates from a small batch (one micro-batch, B_small) and the full step (B_big):
        |G|^2 ~ (B_big |g_big|^2 - B_small |g_small|^2) / (B_big - B_small)
        S     ~ (|g_small|^2 - |g_big|^2) / (1/B_small - 1/B_big)
    each smoothed by an EMA before taking the ratio (the ratio of noisy estimates is biased).
    """

    def __init__(self, cfg: NoiseScaleConfig) -> None:
        self.cfg = cfg
        self.g2_ema: float | None = None
        self.s_ema: float | None = None
        self.last_growth_step = 0

    def update(self, g_small_sq: float, b_small: int, g_big_sq: float, b_big: int) -> float | None:
        if b_big <= b_small or not (math.isfinite(g_small_sq) and math.isfinite(g_big_sq)):
            return self.value
        g2 = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
        s = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
        a = self.cfg.ema
        self.g2_ema = g2 if self.g2_ema is None else a * self.g2_ema + (1 - a) * g2
        self.s_ema = s if self.s_ema is None else a * self.s_ema + (1 - a) * s
        return self.value

    @property
    def value(self) -> float | None:
        if self.g2_ema is None or self.s_ema is None or self.g2_ema <= 0:
            return None
        return self.s_ema / self.g2_ema

    def should_grow(self, step: int, global_batch: int) -> bool:
        """Growing pays when the noise scale exceeds the batch by grow_ratio (steps are then noise-bound)."""
        v = self.value
        if not self.cfg.grow or v is None or step - self.last_growth_step < self.cfg.min_steps_between:
            return False
        if self.cfg.max_global_batch_size is not None and global_batch >= self.cfg.max_global_batch_size:
            return False
        return v > self.cfg.grow_ratio * global_batch

    def state_dict(self) -> dict[str, Any]:
        return {"g2_ema": self.g2_ema, "s_ema": self.s_ema, "last_growth_step": self.last_growth_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.g2_ema, self.s_ema = state.get("g2_ema"), state.get("s_ema")
        self.last_growth_step = int(state.get("last_growth_step", 0))
