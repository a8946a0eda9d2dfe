"""Fixtures of the evaluator tests: one tiny dataset and one briefly trained tiny model per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.evaluator.evaluate import clear_cache
from shared.data.manifest import load_manifest

from .helpers import build_dataset, save, tiny_model, train


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: other processes share the 2 cores, and two threads spin-wait badly then."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    clear_cache()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """Manifest path of a prose + code dataset (~90 validation documents)."""
    return build_dataset(tmp_path_factory.mktemp("evaluator-data"))


@pytest.fixture(scope="session")
def trained(dataset):
    torch.set_num_threads(1)
    # 2 layers of width 64: ~3 s of training reaches a loss well below the unigram one
    return train(tiny_model(dataset, n_layer=2, d_model=64, ffn_hidden=192), dataset, steps=150, batch_size=8, lr=1e-2)


@pytest.fixture(scope="session")
def checkpoint(trained, dataset, tmp_path_factory) -> Path:
    """A trainer-format checkpoint of the trained model (do not modify: shared by the session)."""
    version = load_manifest(dataset).version
    return save(trained, tmp_path_factory.mktemp("evaluator-ckpt"), 30, dataset_version=version, metric=3.0)


@pytest.fixture(scope="session")
def tokenizer(dataset):
    from services.evaluator.heldout import dataset_tokenizer

    return dataset_tokenizer(dataset)
