"""What the loop needs from data: the `BatchSource` protocol, and a small in-memory source.

A batch is a dict of tensors for THIS rank's micro-batch:

    input_ids  LongTensor [B, T]
    labels     LongTensor [B, T]   (next tokens)
    loss_mask  FloatTensor [B, T]  optional, 1 = count the token, 0 = ignore it
    domain     LongTensor [B]      optional, index into `domains`

`cursor` counts samples consumed by all ranks together; a data window to skip is a cursor
range. `state_dict()` is JSON-serialisable and enough to resume the stream exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


class DataSourceError(ValueError):
    """The data cannot serve what the loop asked for."""


@runtime_checkable
class BatchSource(Protocol):
    domains: list[str]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]: ...

    def __next__(self) -> dict[str, torch.Tensor]: ...

    @property
    def cursor(self) -> int:
        """Global samples consumed so far (all ranks)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def set_seq_len(self, seq_len: int) -> None: ...

    def set_batch_size(self, batch_size: int) -> None:
        """Per-rank micro-batch size of the next batches."""
        ...

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Domain sampling weights (normalised by the source)."""
        ...

    def skip(self, n_samples: int) -> None:
        """Advance the cursor by n global samples without reading them."""
        ...


class InMemoryBatchSource:
    """Deterministic random windows over in-memory token arrays, one array per domain.

    Sample k (global index) is a pure function of (seed, k, weights, seq_len): domain drawn
    by weight, window start drawn uniformly. Rank r of W takes samples
    [cursor + r*B, cursor + (r+1)*B) and every rank advances the cursor by B*W, so the
    global batch does not depend on how it is split over ranks.
    """

    def __init__(
        self,
        tokens: np.ndarray | Mapping[str, np.ndarray],
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        weights: Mapping[str, float] | None = None,
        rank: int = 0,
        world_size: int = 1,
        ignore_token: int | None = None,
    ) -> None:
        arrays = {"default": tokens} if isinstance(tokens, np.ndarray) else dict(tokens)
        if not arrays:
            raise DataSourceError("no token arrays given")
        self.domains = list(arrays)
        self._arrays = [np.ascontiguousarray(arrays[d], dtype=np.int64) for d in self.domains]
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.ignore_token = ignore_token
        self._cursor = 0
        self.seq_len = 0
        self.set_seq_len(seq_len)
        self.batch_size = 0
        self.set_batch_size(batch_size)
        self._weights = np.full(len(self.domains), 1.0 / len(self.domains))
        if weights is not None:
            self.set_weights(weights)

    # --- protocol -----------------------------------------------------------------------

    @property
    def cursor(self) -> int:
        return self._cursor

    @property
    def weights(self) -> dict[str, float]:
        return {d: float(w) for d, w in zip(self.domains, self._weights, strict=True)}

    def set_seq_len(self, seq_len: int) -> None:
        shortest = min(len(a) for a in self._arrays)
        if seq_len + 1 > shortest:
            raise DataSourceError(
                f"seq_len {seq_len} needs domains of at least {seq_len + 1} tokens; the shortest has {shortest}"
            )
        self.seq_len = int(seq_len)

    def set_batch_size(self, batch_size: int) -> None:
        if batch_size <= 0:
            raise DataSourceError(f"batch size must be positive, got {batch_size}")
        self.batch_size = int(batch_size)

    def set_weights(self, weights: Mapping[str, float]) -> None:
        unknown = set(weights) - set(self.domains)
        if unknown:
            raise DataSourceError(f"unknown domains {sorted(unknown)}; this source has {self.domains}")
        w = np.array([max(float(weights.get(d, 0.0)), 0.0) for d in self.domains])
        if w.sum() <= 0:
            raise DataSourceError("domain weights must have a positive sum")
        self._weights = w / w.sum()

    def skip(self, n_samples: int) -> None:
        if n_samples < 0:
            raise DataSourceError("cannot skip backwards; restore a state_dict instead")
        self._cursor += int(n_samples)

    def state_dict(self) -> dict[str, Any]:
        return {
            "cursor": self._cursor,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "weights": [float(w) for w in self._weights],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise DataSourceError(f"state was saved with seed {state['seed']}, this source has seed {self.seed}")
        self._cursor = int(state["cursor"])
        self.set_seq_len(int(state["seq_len"]))
        self.set_batch_size(int(state["batch_size"]))
        self._weights = np.asarray(state["weights"], dtype=np.float64)

    def __iter__(self) -> InMemoryBatchSource:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        first = self._cursor + self.rank * B
        cum = np.cumsum(self._weights)
        x = np.empty((B, T + 1), dtype=np.int64)
        dom = np.empty(B, dtype=np.int64)
        for i in range(B):
            rng = np.random.default_rng([self.seed, first + i])
            d = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(cum) - 1)
            arr = self._arrays[d]
            start = int(rng.integers(0, len(arr) - T))
            x[i] = arr[start:start + T + 1]
            dom[i] = d
        self._cursor += B * self.world_size
        batch = {
            "input_ids": torch.from_numpy(x[:, :-1].copy()),
            "labels": torch.from_numpy(x[:, 1:].copy()),
            "domain": torch.from_numpy(dom),
        }
        if self.ignore_token is not None:
            batch["loss_mask"] = (batch["labels"] != self.ignore_token).float()
        return batch


def synthetic_tokens(n_tokens: int, vocab_size: int, *, seed: int = 0, structure: int = 7) -> np.ndarray:
    """A learnable toy stream: a noisy affine recurrence over the vocabulary (for tests/benchmarks)."""
    rng = np.random.default_rng(seed)
    out = np.empty(n_tokens, dtype=np.int64)
    out[0] = rng.integers(vocab_size)
    noise = rng.random(n_tokens) < 0.1
    rand = rng.integers(0, vocab_size, n_tokens)
    for i in range(1, n_tokens):
        out[i] = rand[i] if noise[i] else (out[i - 1] * structure + 3) % vocab_size
    return out
