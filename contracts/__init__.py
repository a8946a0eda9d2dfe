"""Helox contracts: the single source of truth for topics and event payloads.

Depends on pydantic alone, so an outside consumer such as Cyrex can install and import
it by itself.
"""

from .codec import SchemaVersionError, decode, decode_header, encode
from .envelope import SERVICE_NAMES, ArtifactRef, ContractModel, Envelope, EnvelopeHeader, Event, Producer
from .events import (
    AlertEvidence,
    CheckpointSaved,
    DataPrepProgress,
    DatasetReady,
    DeadLetter,
    EvaluationCompleted,
    GateResult,
    HealthAlert,
    Lineage,
    ModelReady,
    RunFailed,
    RunRequested,
    ServiceHeartbeat,
    TrainerAction,
    TrainerCommand,
    TrainingCompleted,
    TrainingMetrics,
    TrainingStarted,
)
from .topics import DEFAULT_PREFIX, EVENT_TYPES, TOPICS, Retention, Topic, topic, topic_for

__all__ = [
    "DEFAULT_PREFIX",
    "EVENT_TYPES",
    "SERVICE_NAMES",
    "TOPICS",
    "AlertEvidence",
    "ArtifactRef",
    "CheckpointSaved",
    "ContractModel",
    "DataPrepProgress",
    "DatasetReady",
    "DeadLetter",
    "Envelope",
    "EnvelopeHeader",
    "EvaluationCompleted",
    "Event",
    "GateResult",
    "HealthAlert",
    "Lineage",
    "ModelReady",
    "Producer",
    "Retention",
    "RunFailed",
    "RunRequested",
    "SchemaVersionError",
    "ServiceHeartbeat",
    "Topic",
    "TrainerAction",
    "TrainerCommand",
    "TrainingCompleted",
    "TrainingMetrics",
    "TrainingStarted",
    "decode",
    "decode_header",
    "encode",
    "topic",
    "topic_for",
]
