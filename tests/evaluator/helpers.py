"""Builders for the evaluator tests and benchmark: a tiny two-domain dataset, a briefly trained
tiny model, and trainer-format checkpoints of it (no pytest imports)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from services.data_prep.pipeline import prepare_dataset
from shared.artifacts import ArtifactStore
from shared.checkpoint import save_checkpoint
from shared.data.dataset import validation_batches
from shared.data.manifest import load_manifest
from shared.model import Llama, model_preset
from tests.data_prep.conftest import make_config, write_corpus


def build_dataset(root: Path, *, n_prose: int = 160, n_code: int = 120, val_fraction: float = 0.3) -> Path:
    """A prose + code dataset with enough validation documents for paired tests; returns the manifest path."""
    write_corpus(root, n_prose=n_prose, n_code=n_code)
    cfg = make_config()
    cfg = cfg.model_copy(update={"sharding": cfg.sharding.model_copy(update={"val_fraction": val_fraction})})
    cwd = os.getcwd()
    os.chdir(root)  # the corpus paths of make_config are relative
    try:
        return prepare_dataset(cfg, ArtifactStore(root / "store")).manifest_path
    finally:
        os.chdir(cwd)


def tiny_model(manifest_path: Path, seed: int = 0, **overrides) -> Llama:
    vocab = load_manifest(manifest_path).tokenizer.vocab_size
    torch.manual_seed(seed)
    return Llama(model_preset("tiny", vocab_size=vocab, max_seq_len=256, **overrides))


def train(model: Llama, manifest_path: Path, *, steps: int = 60, seq_len: int = 64, batch_size: int = 16,
          lr: float = 3e-3, seed: int = 0) -> Llama:
    """A few AdamW steps on random training windows (enough to beat the unigram baseline)."""
    windows = torch.cat([b.input_ids for _, b in validation_batches(manifest_path, 64, seq_len + 1, split="train")])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        rows = windows[torch.randint(0, windows.size(0), (batch_size,), generator=gen)]
        logits = model(rows[:, :-1])
        loss = F.cross_entropy(logits.transpose(1, 2), rows[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model


@torch.no_grad()
def perturbed(model: Llama, std: float, seed: int = 1) -> Llama:
    """A copy with Gaussian noise of the given relative std added to every weight."""
    other = Llama(model.config)
    other.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    for p in other.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * std * (p.float().std() if p.numel() > 1 else 1.0))
    return other


def save(model: Llama, root: Path, step: int, *, dataset_version: str = "test", metric: float | None = None,
         reason: str = "interval") -> Path:
    """A checkpoint in the trainer's layout: model_config in state.json, dataset_version in the meta."""
    state = {"model_config": model.config.model_dump(mode="json"), "step": step}
    meta = {"reason": reason, "dataset_version": dataset_version, "val_loss": metric}
    info = save_checkpoint(root, step, model.state_dict(), state,
                           metric=None if metric is None or not math.isfinite(metric) else metric, meta=meta)
    return info.path
