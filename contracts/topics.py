"""The topic registry: topic key -> payload model -> retention policy.

A stream's name is the deployment prefix (default ``helox.``) plus the topic key, so
several deployments can share one Redis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from . import events as ev
from .envelope import Event

DEFAULT_PREFIX = "helox."


@dataclass(frozen=True)
class Retention:
    """Trimmed telemetry keeps about `maxlen` entries (XADD MAXLEN ~); kept lifecycle streams keep all."""

    kind: Literal["trimmed", "kept"]
    maxlen: int | None = None


KEPT = Retention("kept")


@dataclass(frozen=True)
class Topic:
    key: str
    payload: type[Event]
    retention: Retention
    description: str

    def stream(self, prefix: str = DEFAULT_PREFIX) -> str:
        return f"{prefix}{self.key}"


_TOPICS = [
    Topic("runs.requested", ev.RunRequested, KEPT, "A run was asked for."),
    Topic("runs.failed", ev.RunFailed, KEPT, "A run stopped for good."),
    Topic("runs.cancelled", ev.RunCancelled, KEPT, "A run was cancelled: every service stops its work for it."),
    Topic("data.progress", ev.DataPrepProgress, Retention("trimmed", 10_000), "Data-prep progress."),
    Topic("data.dataset-ready", ev.DatasetReady, KEPT, "A dataset version is ready."),
    Topic("train.started", ev.TrainingStarted, KEPT, "Training started or resumed."),
    Topic("train.metrics", ev.TrainingMetrics, Retention("trimmed", 100_000), "Training metrics."),
    Topic("train.checkpoint-saved", ev.CheckpointSaved, KEPT, "A checkpoint is durable."),
    Topic("train.actions", ev.TrainerAction, KEPT, "Decisions the trainer applied."),
    Topic("train.completed", ev.TrainingCompleted, KEPT, "Training finished."),
    Topic("train.commands", ev.TrainerCommand, KEPT, "Commands to a running trainer."),
    Topic("health.alerts", ev.HealthAlert, KEPT, "Incidents and their resolutions."),
    Topic("eval.completed", ev.EvaluationCompleted, KEPT, "A checkpoint was judged."),
    Topic("export.model-ready", ev.ModelReady, KEPT, "An exported model is published."),
    Topic("services.heartbeat", ev.ServiceHeartbeat, Retention("trimmed", 10_000), "Service liveness."),
    Topic("dlq", ev.DeadLetter, KEPT, "Dead letters: messages that could not be handled."),
    Topic("retrieval.heartbeat", ev.RetrieverHeartbeat, Retention("trimmed", 10_000), "Retrievers (Cyrex) announce themselves."),
    # Request/reply traffic: an entry trimmed before it was read only times out, and the
    # requester falls back; nothing of the run depends on keeping these.
    Topic("retrieval.requested", ev.RetrievalRequested, Retention("trimmed", 100_000), "Batches of retrieval queries."),
    Topic("retrieval.completed", ev.RetrievalCompleted, Retention("trimmed", 100_000), "Answers to retrieval requests."),
    Topic("retrieval.fallback", ev.RetrievalFallback, KEPT, "A requester fell back to another retriever."),
]

TOPICS: dict[str, Topic] = {t.key: t for t in _TOPICS}
"""Topic key -> Topic."""

EVENT_TYPES: dict[str, type[Event]] = {t.payload.EVENT_TYPE: t.payload for t in _TOPICS}
"""Event type name -> payload model."""

_BY_PAYLOAD: dict[type[Event], Topic] = {t.payload: t for t in _TOPICS}


def marker_prefix(prefix: str = DEFAULT_PREFIX) -> str:
    """Namespace of a deployment's non-stream keys (idempotency and outbox markers):
    'helox.' -> 'helox:', so deployments sharing a Redis keep them apart too."""
    return prefix.rstrip(".:") + ":"


def topic_for(payload: type[Event] | Event) -> Topic:
    """The topic a payload type is published on."""
    cls = payload if isinstance(payload, type) else type(payload)
    try:
        return _BY_PAYLOAD[cls]
    except KeyError:
        raise KeyError(f"{cls.__name__} is not registered in contracts.topics") from None


def topic(key: str) -> Topic:
    """Look a topic up by key (e.g. 'train.metrics'), with a helpful error."""
    try:
        return TOPICS[key]
    except KeyError:
        raise KeyError(f"unknown topic {key!r}; known: {', '.join(sorted(TOPICS))}") from None
