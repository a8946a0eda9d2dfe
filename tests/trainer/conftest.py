"""Fixtures for the trainer tests: a tiny model, two toy domains, fast settings."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from services.trainer.data import InMemoryBatchSource

from .helpers import make_domains


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tiny model gains nothing from two, and two spin-wait badly when
    other processes share the 2 cores (measured: the same test took 1 s or 28 s). The worker
    subprocesses use one thread too, so in-process and subprocess runs are bit-comparable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def domains() -> dict[str, np.ndarray]:
    return make_domains()


@pytest.fixture
def source(domains):
    def make(batch_size: int = 4, seq_len: int = 32, seed: int = 0, **kw: Any) -> InMemoryBatchSource:
        return InMemoryBatchSource(domains, seq_len=seq_len, batch_size=batch_size, seed=seed, **kw)

    return make
