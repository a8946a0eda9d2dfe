"""The trainer-job factory: a validated train config + a dataset manifest + an output dir +
a distributed context -> a ready `Trainer`.

The trainer service, `helox train` and a `torchrun` launch all build their job here, so
the three cannot drift apart (which rank reads which samples, which validation batches,
which histogram baseline the drift probe compares against).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shared.data.dataset import BatchLoader, TokenDataset
from shared.data.manifest import load_histograms, load_manifest

from .config import TrainConfig
from .distributed import DistContext, init_distributed
from .hooks import Callback
from .loop import Trainer, TrainingError


def train_config(train: dict[str, Any], *, vocab_size: int, dataset_version: str) -> TrainConfig:
    """The run's `train` section, bound to its dataset: the model's vocabulary is the tokenizer's."""
    overrides = {**train.get("model_overrides", {}), "vocab_size": vocab_size}
    return TrainConfig.model_validate({**train, "model_overrides": overrides, "dataset_version": dataset_version})


def train_config_for_manifest(train: dict[str, Any], manifest_path: Path) -> TrainConfig:
    """`train_config` with the vocabulary and version read from the dataset's manifest."""
    m = load_manifest(manifest_path)
    return train_config(train, vocab_size=m.tokenizer.vocab_size, dataset_version=m.version)


def histogram_baseline(manifest_path: Path) -> np.ndarray | None:
    """The train split's unigram histogram (the token-drift probe's reference), if recorded."""
    hists = load_histograms(manifest_path)
    train = [v for k, v in hists.items() if k.startswith("train/")]
    return np.sum(train, axis=0) if train else None


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """Samples per rank of a global batch; refused unless the ranks split it evenly."""
    if global_batch % world_size:
        raise TrainingError(
            f"train.batch.global_batch_size ({global_batch}) is not divisible by the world size ({world_size}): "
            f"use a multiple of {world_size}, or a number of ranks that divides it"
        )
    return global_batch // world_size


def build_trainer(
    cfg: TrainConfig,
    manifest_path: Path,
    out_dir: Path,
    *,
    dist: DistContext | None = None,
    run_id: str | None = None,
    callbacks: list[Callback] = (),
) -> Trainer:
    """The Trainer for one run: this rank's part of the dataset's train stream, and its
    part of the fixed validation batches.

    `dist` defaults to what torchrun's environment says (one process when it says nothing).
    Every rank reads a disjoint slice of each global batch (`rank`/`world_size` go to the
    dataset), so the sample order does not depend on the number of ranks.
    """
    ctx = dist or init_distributed(cfg.distributed, cfg.device)
    world, rank = ctx.world_size, ctx.rank
    per_rank = per_rank_batch(cfg.batch.global_batch_size, world)
    T = cfg.curriculum.seq_len_start or cfg.batch.seq_len
    data = BatchLoader(TokenDataset(manifest_path, "train", batch_size=per_rank, seq_len=T, seed=cfg.seed,
                                    rank=rank, world_size=world))
    val = BatchLoader(TokenDataset(manifest_path, "val", batch_size=per_rank, seq_len=cfg.batch.seq_len,
                                   seed=cfg.seed, rank=rank, world_size=world))
    return Trainer(cfg, data, out_dir, val_data=val, callbacks=list(callbacks),
                   baseline_histogram=histogram_baseline(manifest_path), dist=ctx, run_id=run_id)
