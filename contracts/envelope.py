"""The common envelope every Helox event travels in, and the base of every payload.

Wire format: the envelope serialised as JSON (UTF-8), in a FastStream frame in the stream
entry's `__data__` field (byte by byte: contracts/WIRE.md). Non-finite floats travel as the
strings "NaN", "Infinity", "-Infinity" so the payload stays valid JSON and a NaN loss
still reaches the health monitor.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

SERVICE_NAMES = ("data-prep", "trainer", "health-monitor", "evaluator", "exporter")
"""Service names used everywhere: heartbeats, logs, consumer groups, compose services."""


class ContractModel(BaseModel):
    """Base of every contract model: consumers ignore unknown fields (forward compatible)."""

    model_config = ConfigDict(extra="ignore", ser_json_inf_nan="strings", frozen=False)


class Event(ContractModel):
    """Base of every event payload. Subclasses set EVENT_TYPE and SCHEMA_VERSION.

    Within a major version changes are additive (new optional fields); a consumer
    rejects an unknown major version to the dead-letter stream.
    """

    EVENT_TYPE: ClassVar[str] = ""
    SCHEMA_VERSION: ClassVar[str] = "1.0"


class Producer(ContractModel):
    """Which process produced an event."""

    service: str = Field(description="Service name, e.g. 'trainer' or 'cli'.")
    instance: str = Field(description="Stable instance name (host:pid or a configured name).")


class ArtifactRef(ContractModel):
    """A reference to a file in the artifact store: never the bytes themselves."""

    uri: str = Field(description="fsspec-style URI, e.g. file:///artifacts/datasets/abc/manifest.json")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the file's bytes.")
    size_bytes: int = Field(ge=0, description="Size of the file in bytes.")


P = TypeVar("P", bound=Event)


def _major(version: str) -> int:
    return int(version.split(".", 1)[0])


class Envelope(ContractModel, Generic[P]):
    """Metadata common to every event, wrapping one typed payload."""

    event_id: uuid.UUID = Field(default_factory=uuid.uuid4, description="Unique id of this event.")
    type: str = Field(description="Event type name, e.g. 'CheckpointSaved'.")
    schema_version: str = Field(
        pattern=r"^\d+\.\d+$", description="major.minor of the payload schema."
    )
    occurred_at: datetime = Field(
        default_factory=lambda: datetime.now(UTC), description="When it happened (UTC)."
    )
    run_id: str | None = Field(default=None, description="Training run this event belongs to.")
    producer: Producer
    causation_id: uuid.UUID | None = Field(
        default=None, description="event_id of the event whose handling caused this one."
    )
    correlation_id: uuid.UUID | None = Field(
        default=None, description="Id shared by every event of one causal chain (defaults to the root event)."
    )
    payload: P

    @field_validator("occurred_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    @property
    def major(self) -> int:
        return _major(self.schema_version)


class EnvelopeHeader(ContractModel):
    """The envelope without its payload: what a consumer reads first to route and version-check."""

    event_id: uuid.UUID
    type: str
    schema_version: str = Field(pattern=r"^\d+\.\d+$")
    occurred_at: datetime
    run_id: str | None = None
    producer: Producer
    causation_id: uuid.UUID | None = None
    correlation_id: uuid.UUID | None = None
    payload: dict[str, Any]

    @property
    def major(self) -> int:
        return _major(self.schema_version)
