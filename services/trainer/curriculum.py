"""What each step trains on: sequence-length warmup, batch-size ramp, micro-batching.

`Curriculum.plan(step)` is a pure function of the step and a small state (a batch size set
by the noise-scale controller), so a resumed run sees the same plans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .config import BatchConfig, CurriculumConfig


class BatchPlanError(ValueError):
    """A batch size that cannot be split over ranks and micro-batches."""


@dataclass(frozen=True)
class StepPlan:
    seq_len: int
    global_batch: int  # sequences per optimizer step, all ranks
    micro_batch: int  # sequences per forward, per rank
    accum: int  # micro-batches per step, per rank
    lr_scale: float  # batch-size LR factor, sqrt(batch / reference)

    @property
    def tokens(self) -> int:
        return self.global_batch * self.seq_len


def seq_len_at(step: int, *, start: int | None, end: int, warmup_steps: int, multiple: int) -> int:
    """Linear warmup from `start` to `end` over `warmup_steps`, rounded down to `multiple`."""
    if start is None or warmup_steps <= 0 or step > warmup_steps:
        return end
    t = start + (end - start) * (step - 1) / warmup_steps
    return int(min(end, max(start, (int(t) // multiple) * multiple)))


def largest_divisor_at_most(n: int, cap: int) -> int:
    for d in range(min(n, cap), 0, -1):
        if n % d == 0:
            return d
    return 1


class Curriculum:
    def __init__(self, batch: BatchConfig, cfg: CurriculumConfig, *, world_size: int, micro_batch: int) -> None:
        self.batch, self.cfg, self.world_size, self.max_micro = batch, cfg, world_size, micro_batch
        self.batch_override: int | None = None  # set by the noise-scale controller
        self._ramp = sorted(cfg.batch_ramp)
        for _, b in self._ramp:
            self._check_divisible(b)
        self._check_divisible(batch.global_batch_size)

    def _check_divisible(self, global_batch: int) -> None:
        if global_batch % self.world_size:
            raise BatchPlanError(
                f"global batch {global_batch} is not divisible by world size {self.world_size}; "
                f"use a multiple of {self.world_size}"
            )

    def global_batch_at(self, step: int) -> int:
        if self.batch_override is not None:
            return self.batch_override
        if not self._ramp:
            return self.batch.global_batch_size
        size = self._ramp[0][1]  # before the first entry: the ramp's starting size
        for from_step, b in self._ramp:
            if step >= from_step:
                size = b
        return size

    def plan(self, step: int) -> StepPlan:
        full = self.batch.seq_len
        seq = seq_len_at(step, start=self.cfg.seq_len_start, end=full, warmup_steps=self.cfg.seq_len_warmup_steps,
                         multiple=self.cfg.seq_len_multiple)
        global_batch = self.global_batch_at(step)
        lr_scale = math.sqrt(global_batch / self.batch.global_batch_size) if self.cfg.scale_lr_with_batch else 1.0
        per_rank = global_batch // self.world_size
        micro = largest_divisor_at_most(per_rank, self.max_micro)
        accum = per_rank // micro
        if self.cfg.keep_tokens_constant and seq < full:
            # Shorter sequences, proportionally more of them: tokens per step stay constant.
            factor = full // seq
            global_batch, micro = global_batch * factor, micro * factor
        return StepPlan(seq, global_batch, micro, accum, lr_scale)

    def grow(self, step: int, factor: int, max_batch: int | None) -> int | None:
        """Multiply the global batch (noise-scale decision); returns the new size or None if capped."""
        current = self.global_batch_at(step)
        new = current * factor
        if max_batch is not None:
            new = min(new, max_batch)
        new -= new % self.world_size
        if new <= current:
            return None
        self.batch_override = new
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"batch_override": self.batch_override}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_override = state.get("batch_override")
