"""Fixtures of the exporter tests: a sentencepiece tokenizer, a briefly trained tiny model saved
as a trainer checkpoint, and one full export of it shared by the format tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from services.data_prep.tokenizer import train_tokenizer
from services.exporter.config import GGUF_TYPES, ExportConfig
from services.exporter.export import ExportResult, export_checkpoint
from shared.checkpoint import save_checkpoint
from shared.data.config import TokenizerConfig
from shared.model import Llama, ModelConfig, model_preset
from tests.data_prep.conftest import code_doc, shakespeare_paragraphs

SIGNING_KEY = "test-signing-key"
RUN_ID = "run-export-test"
DATASET_VERSION = "ds-test-1"
CONFIG_HASH = "c" * 64
SEQ = 64


@dataclass
class Trained:
    """A tiny model trained for a few steps on tokenized text, with its data and checkpoint."""

    config: ModelConfig
    state: dict[str, torch.Tensor]
    train: np.ndarray  # token ids
    val: np.ndarray
    checkpoint: Path
    tokenizer: Path


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: other work shares the 2 cores (see tests/trainer/conftest.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def texts() -> list[str]:
    """Prose and code, shuffled (seeded) so that the validation tail holds both."""
    docs = shakespeare_paragraphs(400) + [code_doc(i) for i in range(120)]
    order = np.random.default_rng(0).permutation(len(docs))
    return [docs[i] for i in order]


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(train_tokenizer(texts(), TokenizerConfig(vocab_size=1024)))
    return path


def batches(tokens: np.ndarray, n: int, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        starts = rng.integers(0, len(tokens) - SEQ - 1, size=batch)
        x = np.stack([tokens[s:s + SEQ + 1] for s in starts]).astype(np.int64)
        yield torch.from_numpy(x[:, :-1]), torch.from_numpy(x[:, 1:])


def train_steps(model: Llama, tokens: np.ndarray, steps: int, *, lr: float, seed: int, batch: int = 8) -> None:
    """Plain AdamW steps on random windows of `tokens` (continued training / fine-tuning)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    for x, y in batches(tokens, steps, batch, seed):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def val_loss(model: Llama, tokens: np.ndarray, n_windows: int = 48) -> float:
    """Mean next-token loss over fixed, non-overlapping validation windows."""
    model.eval()
    n = min(n_windows, (len(tokens) - 1) // SEQ)
    x = torch.from_numpy(tokens[: n * SEQ].astype(np.int64)).view(n, SEQ)
    y = torch.from_numpy(tokens[1: n * SEQ + 1].astype(np.int64)).view(n, SEQ)
    return float(torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()))


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tokenizer_path) -> Trained:
    import sentencepiece as spm

    torch.set_num_threads(1)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    ids = np.concatenate([np.array(sp.encode(t) + [sp.eos_id()], dtype=np.int64) for t in texts()])
    split = int(len(ids) * 0.9)
    train, val = ids[:split], ids[split:]
    config = model_preset("tiny")
    torch.manual_seed(0)
    model = Llama(config)
    train_steps(model, train, 200, lr=3e-3, seed=0)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    info = save_checkpoint(
        tmp_path_factory.mktemp("ckpt"), 200, state,
        {"step": 200, "model_config": config.model_dump(mode="json"), "dataset_version": DATASET_VERSION},
        metric=val_loss(model, val), meta={"reason": "final", "dataset_version": DATASET_VERSION, "run_id": RUN_ID},
    )
    return Trained(config, state, train, val, info.path, tokenizer_path)


def trained_model(t: Trained) -> Llama:
    model = Llama(t.config)
    model.load_state_dict(t.state, strict=True)
    return model.eval()


@pytest.fixture(scope="session")
def export_result(tmp_path_factory, trained) -> ExportResult:
    """Every format, every GGUF type: exported once for the session."""
    torch.set_num_threads(1)
    cfg = ExportConfig(gguf_types=list(GGUF_TYPES))
    return export_checkpoint(
        trained.checkpoint, trained.tokenizer, None, tmp_path_factory.mktemp("exports"),
        run_id=RUN_ID, dataset_version=DATASET_VERSION, config_hash=CONFIG_HASH, signing_key=SIGNING_KEY,
        config=cfg, metrics={"val_loss": 3.2, "val_ppl": 24.5},
    )
