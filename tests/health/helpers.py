"""Small builders shared by the health-monitor tests."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from contracts import Producer, TrainingMetrics
from contracts.codec import envelope
from contracts.envelope import Envelope, Event

PRODUCER = Producer(service="test", instance="test-1")


def metrics(step: int, loss: float = 3.0, **kw: Any) -> TrainingMetrics:
    base: dict[str, Any] = {"step": step, "tokens_seen": step * 1000, "lr": 3e-4, "grad_norm": 1.0, "seq_len": 256,
                            "batch_size": 16, "tokens_per_s": 50_000.0, "data_cursor": step * 16}
    base.update(kw)
    return TrainingMetrics(loss=loss, **base)


def env(payload: Event, run_id: str, at: float) -> Envelope[Any]:
    """An envelope whose occurred_at is `at` (unix seconds), as if read back from the stream."""
    e = envelope(payload, producer=PRODUCER, run_id=run_id)
    e.occurred_at = datetime.fromtimestamp(at, UTC)
    return e


def clean_series(n: int, *, start: int = 0, noise: float = 0.01, seed: int = 0, **kw: Any) -> list[TrainingMetrics]:
    """A decaying, slightly noisy loss curve with steady gradients and throughput."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(start, start + n):
        step = 10 * (i + 1)
        loss = (2.0 + 6.0 * (1 + step / 500) ** -0.5) * (1 + noise * rng.gauss(0, 1))
        out.append(metrics(step, loss, grad_norm=1.0 * (1 + 0.1 * rng.gauss(0, 1)),
                           tokens_per_s=50_000 * (1 + 0.02 * rng.gauss(0, 1)), **kw))
    return out
