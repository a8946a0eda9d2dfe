"""The trainer's side of checkpoints: when to save, what (model, optimizer, RNG per rank, the trainer's
state), the background write on rank 0, and loading it back into a (possibly differently sized) job.

    ckpt = TrainCheckpointer(root, cfg, ctx, model, optimizer, collect)
    ckpt.maybe_save(step, applied=...)     the interval cadence (checkpoint.every)
    ckpt.save(step, reason)                any other reason (final, command, signal, rollback-point)
    ckpt.finished()                        writes that completed since the last call

The file format itself is `shared.checkpoint`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from shared.checkpoint import (
    Checkpoint,
    CheckpointCorruptError,
    CheckpointInfo,
    CheckpointNotFoundError,
    CheckpointWriter,
    clean_temporary,
    latest_valid_checkpoint,
    load_checkpoint,
    snapshot,
)
from shared.logging import get_logger

from .config import CheckpointConfig
from .distributed import DistContext, get_full_state, set_full_state, unwrap

log = get_logger("helox.trainer")

# (state, metric, meta) of the trainer at save time, for a checkpoint written for `reason`.
Collect = Callable[[str], tuple[dict[str, Any], float | None, dict[str, Any]]]


def capture_rng() -> dict[str, Any]:
    """Every generator the process uses: Python, NumPy (legacy global), torch CPU and CUDA."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # a different GPU count: seed what exists from what was saved
            for i in range(torch.cuda.device_count()):
                torch.cuda.set_rng_state(cuda[i % len(cuda)], i)


def _clear_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Back to a never-stepped optimizer: state is created again lazily by the next step()."""
    optimizer.state.clear()
    local = getattr(optimizer, "optim", None)  # ZeroRedundancyOptimizer keeps this rank's state there
    if isinstance(local, torch.optim.Optimizer):
        local.state.clear()


class TrainCheckpointer:
    """Saves on the configured cadence and on request; restores model, optimizer and RNG.

    `collect(reason)` returns the trainer's (state, metric, meta) at save time. Every rank calls
    `save` (the state collection is collective); rank 0 snapshots and queues the write.
    """

    def __init__(self, root: str | Path, cfg: CheckpointConfig, ctx: DistContext, model: nn.Module,
                 optimizer: torch.optim.Optimizer, collect: Collect) -> None:
        self.root, self.cfg, self.ctx = Path(root), cfg, ctx
        self.model, self.optimizer, self.collect = model, optimizer, collect
        self.last_step: int | None = None  # step of the newest checkpoint written, resumed or rolled back to
        self.skipped: list[CheckpointCorruptError] = []  # corrupt checkpoints `resolve("latest")` passed over
        self.written: list[CheckpointInfo] = []  # every write that completed, in order
        self.writer: CheckpointWriter | None = None
        if ctx.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            clean_temporary(self.root)
            self.writer = CheckpointWriter(self.root, keep_last=cfg.keep_last, keep_best=cfg.keep_best,
                                           background=cfg.background, duty_cycle=cfg.write_duty_cycle)

    # --- cadence ------------------------------------------------------------------------------

    def maybe_save_initial(self) -> Future | None:
        """The step-0 rollback point, when `checkpoint.at_start` asks for one."""
        return self.save(0, "rollback-point") if self.cfg.at_start else None

    def maybe_save(self, step: int, *, applied: bool, skip_reason: str = "") -> Future | None:
        """The interval checkpoint, when `step` is on the cadence and its update was applied."""
        if not self.cfg.every or step % self.cfg.every:
            return None
        if not applied:  # a non-finite step: the state may be poisoned, and a rollback target must be good
            log.warning("trainer.checkpoint_skipped", step=step, reason=skip_reason)
            return None
        return self.save(step, "interval")

    # --- writing ------------------------------------------------------------------------------

    def save(self, step: int, reason: str) -> Future | None:
        """Collective: every rank calls it; rank 0 snapshots and queues the write (returns its Future)."""
        state, metric, meta = self.collect(reason)
        model_state, optim_state = self._full_state()
        rngs = self.ctx.all_gather_objects(capture_rng())
        self.last_step = step
        if not self.ctx.is_main:
            return None
        full = {**state, "optimizer": optim_state, "rng": {str(r): s for r, s in enumerate(rngs)}}
        return self.writer.submit(snapshot(step, model_state, full, metric=metric, meta=meta))

    def _full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self.optimizer.state or self.ctx.zero:
            return get_full_state(self.model, self.optimizer, self.ctx)
        # Never stepped: torch's get_state_dict would create the state with a zero-gradient step(),
        # which counts as an AdamW step and so changes every later update (issue 13). Saved as empty.
        model_state, _ = get_full_state(self.model, (), self.ctx)  # no optimizers: the model's state only
        return model_state, {}

    def finished(self) -> list[CheckpointInfo]:
        """Checkpoints whose write completed since the last call, in order; a failed write raises here."""
        if self.writer is None:
            return []
        infos = [fut.result() for fut in self.writer.done()]
        self.written += infos
        return infos

    def wait(self) -> None:
        if self.writer is not None:
            self.writer.wait()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    # --- reading ------------------------------------------------------------------------------

    def resolve(self, resume: str | Path, *, before_step: int | None = None) -> Path:
        """'latest' -> the newest valid checkpoint under root (corrupt ones passed over land in
        `skipped`); otherwise the path itself."""
        if str(resume) == "latest":
            self.wait()
            path = latest_valid_checkpoint(self.root, before_step=before_step, on_corrupt=self.skipped.append)
            if path is None:
                where = f" before step {before_step}" if before_step is not None else ""
                raise CheckpointNotFoundError(f"no valid checkpoint{where} under {self.root}")
            return path
        return Path(resume)

    def load(self, path: str | Path, *, expected_digest: str | None = None) -> Checkpoint:
        """Every rank reads and verifies the files (a shared filesystem is assumed across nodes)."""
        return load_checkpoint(path, expected_digest=expected_digest)

    def restore(self, ckpt: Checkpoint) -> None:
        """Model, optimizer and this rank's RNG (rank 0's when the job was smaller)."""
        optim_state = ckpt.state["optimizer"]
        if optim_state:
            set_full_state(self.model, self.optimizer, ckpt.model, optim_state, self.ctx)
        elif self.ctx.zero:
            unwrap(self.model).load_state_dict(ckpt.model, strict=True)
        else:
            set_full_state(self.model, (), ckpt.model, {}, self.ctx)
        if not optim_state.get("state"):  # saved before the first step: the optimizer starts afresh
            _clear_optimizer_state(self.optimizer)
        self.last_step = ckpt.step
        rngs = ckpt.state.get("rng", {})
        rng = rngs.get(str(self.ctx.rank)) or rngs.get("0")
        if rng is not None:
            restore_rng(rng)
