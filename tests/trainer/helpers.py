"""Builders shared by the trainer tests and their subprocess worker (no pytest imports)."""

from __future__ import annotations

from typing import Any

import numpy as np

from services.trainer.config import TrainConfig
from services.trainer.data import synthetic_tokens
from services.trainer.hooks import Callback

VOCAB = 1024  # the tiny preset's vocabulary
DATA_VOCAB = 256  # the toy data uses the first 256 ids: learning shows within a few steps


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_config(**overrides: Any) -> TrainConfig:
    """Tiny model, seq 32, global batch 8 in micro-batches of 4, quiet, no checkpoints unless asked."""
    base: dict[str, Any] = {
        "model": "tiny",
        "max_steps": 8,
        "seed": 0,
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "batch": {"global_batch_size": 8, "micro_batch_size": 4, "seq_len": 32},
        "probes": {"enabled": False},
        "log": {"every": 1000, "structlog": False, "wandb": {"mode": "disabled"}},
        "checkpoint": {"every": None},
    }
    return TrainConfig(**_merge(base, overrides))


def make_domains() -> dict[str, np.ndarray]:
    return {
        "code": synthetic_tokens(20_000, DATA_VOCAB, seed=1, structure=7),
        "prose": synthetic_tokens(20_000, DATA_VOCAB, seed=2, structure=11),
    }


class Recorder(Callback):
    """Remembers every step result and action; runs `at[step](trainer)` after that step."""

    def __init__(self, at=None):
        self.results, self.actions, self.at = [], [], at or {}

    def on_step_end(self, trainer, result):
        self.results.append(result)
        if result.step in self.at:
            self.at[result.step](trainer)

    def on_action(self, trainer, action):
        self.actions.append(action)
