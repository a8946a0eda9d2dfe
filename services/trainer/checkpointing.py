"""The trainer's side of checkpoints: collect full state (model, optimizer, RNG per rank), snapshot,
hand to the background writer on rank 0; and load it back into a (possibly differently sized) job.

The file format itself is `shared.checkpoint`.
"""

from __future__ import annotations

import random
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from shared.checkpoint import (
    Checkpoint,
    CheckpointNotFoundError,
    CheckpointWriter,
    clean_temporary,
    latest_valid_checkpoint,
    load_checkpoint,
    snapshot,
)

from .config import CheckpointConfig
from .distributed import DistContext, get_full_state, set_full_state


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


class TrainCheckpointer:
    def __init__(self, root: str | Path, cfg: CheckpointConfig, ctx: DistContext) -> None:
        self.root, self.cfg, self.ctx = Path(root), cfg, ctx
        self.writer: CheckpointWriter | None = None
        if ctx.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            clean_temporary(self.root)
            self.writer = CheckpointWriter(self.root, keep_last=cfg.keep_last, keep_best=cfg.keep_best,
                                           background=cfg.background, duty_cycle=cfg.write_duty_cycle)

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], *,
             metric: float | None, meta: dict[str, Any]) -> Future | None:
        """Collective: every rank calls it; rank 0 snapshots and queues the write (returns its Future)."""
        model_state, optim_state = get_full_state(model, optimizer, self.ctx)
        rngs = self.ctx.all_gather_objects(capture_rng())
        if not self.ctx.is_main:
            return None
        full = {**state, "optimizer": optim_state, "rng": {str(r): s for r, s in enumerate(rngs)}}
        snap = snapshot(step, model_state, full, metric=metric, meta=meta)
        return self.writer.submit(snap)

    def wait(self) -> None:
        if self.writer is not None:
            self.writer.wait()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def resolve(self, resume: str | Path, *, before_step: int | None = None) -> Path:
        """'latest' -> the newest valid checkpoint under root; otherwise the path itself."""
        if str(resume) == "latest":
            self.wait()
            path = latest_valid_checkpoint(self.root, before_step=before_step)
            if path is None:
                where = f" before step {before_step}" if before_step is not None else ""
                raise CheckpointNotFoundError(f"no valid checkpoint{where} under {self.root}")
            return path
        return Path(resume)

    def load(self, path: str | Path, *, expected_digest: str | None = None) -> Checkpoint:
        """Every rank reads and verifies the files (a shared filesystem is assumed across nodes)."""
        return load_checkpoint(path, expected_digest=expected_digest)

    def restore(self, ckpt: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Model, optimizer and this rank's RNG (rank 0's when the job was smaller)."""
        set_full_state(model, optimizer, ckpt.model, ckpt.state["optimizer"], self.ctx)
        rngs = ckpt.state.get("rng", {})
        rng = rngs.get(str(self.ctx.rank)) or rngs.get("0")
        if rng is not None:
            restore_rng(rng)
