"""Encoding and decoding of envelopes to and from the wire (JSON bytes).

Decoding is strict about what matters and lenient about what may grow:
- bytes that are not a JSON envelope raise ``DecodeError``;
- an unknown event type or an unknown *major* schema version raise ``SchemaVersionError``;
- a payload that does not validate raises pydantic's ``ValidationError``;
- unknown fields and newer *minor* versions are accepted (extra fields ignored).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from functools import cache
from typing import Any, TypeVar

from pydantic import ValidationError

from .envelope import Envelope, EnvelopeHeader, Event, Producer
from .topics import EVENT_TYPES

P = TypeVar("P", bound=Event)


class DecodeError(ValueError):
    """The bytes are not a Helox envelope at all."""


class SchemaVersionError(ValueError):
    """The event type is unknown, or its major schema version is not one this code speaks."""


def envelope(
    payload: P,
    *,
    producer: Producer,
    run_id: str | None = None,
    causation_id: uuid.UUID | None = None,
    correlation_id: uuid.UUID | None = None,
) -> Envelope[P]:
    """Wrap a payload in a new envelope (fresh event_id, now as occurred_at)."""
    cls = type(payload)
    if not isinstance(payload, Event) or not cls.EVENT_TYPE:
        raise TypeError(f"{cls.__name__} is not a registered event payload")
    # Payload and producer are validated models already: construct without re-validating,
    # because this runs on the trainer's hot path (Outbox.publish).
    event_id = uuid.uuid4()
    return _envelope_class(cls).model_construct(  # type: ignore[valid-type]
        event_id=event_id,
        type=cls.EVENT_TYPE,
        schema_version=cls.SCHEMA_VERSION,
        occurred_at=datetime.now(UTC),
        run_id=run_id,
        producer=producer,
        causation_id=causation_id,
        correlation_id=correlation_id or event_id,
        payload=payload,
    )


@cache
def _envelope_class(cls: type[Event]) -> type[Envelope[Any]]:
    return Envelope[cls]  # type: ignore[valid-type]


def encode_new(
    payload: Event,
    *,
    producer_json: bytes,
    run_id: str | None = None,
    causation_id: uuid.UUID | None = None,
    correlation_id: uuid.UUID | None = None,
) -> tuple[uuid.UUID, bytes]:
    """Envelope JSON for a new event, written directly (no Envelope object): the batch
    publishing fast path. `producer_json` is the producer's JSON, serialised once.
    Produces what `encode(envelope(...))` would (field order aside)."""
    cls = type(payload)
    if not cls.EVENT_TYPE:
        raise TypeError(f"{cls.__name__} is not a registered event payload")
    event_id = uuid.uuid4()
    eid = str(event_id).encode()
    head = b'{"event_id":"%s","type":"%s","schema_version":"%s","occurred_at":"%s","run_id":%s,"producer":%s,' % (
        eid,
        cls.EVENT_TYPE.encode(),
        cls.SCHEMA_VERSION.encode(),
        datetime.now(UTC).isoformat().encode(),
        _json_str(run_id),
        producer_json,
    )
    tail = b'"causation_id":%s,"correlation_id":"%s","payload":%s}' % (
        _json_str(str(causation_id) if causation_id else None),
        str(correlation_id).encode() if correlation_id else eid,
        payload.__pydantic_serializer__.to_json(payload),  # model config: non-finite floats as strings
    )
    return event_id, head + tail


def _json_str(value: str | None) -> bytes:
    return b"null" if value is None else json.dumps(value).encode()


def encode(env: Envelope[Event]) -> bytes:
    """Serialise an envelope to JSON bytes (non-finite floats as strings)."""
    return env.model_dump_json().encode()


def decode_header(raw: bytes | str) -> EnvelopeHeader:
    """Read the envelope's metadata, leaving the payload as a dict. Raises DecodeError
    whose message names the fault: not UTF-8, not JSON, not an object, or which envelope
    fields are missing or wrong."""
    try:
        return EnvelopeHeader.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            if isinstance(raw, bytes):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as bad:
                    raise DecodeError(f"the body is not UTF-8 ({bad.reason} at byte {bad.start})") from exc
            reason = str(first.get("msg", "")).removeprefix("Invalid JSON: ")
            raise DecodeError(f"the body is not JSON ({reason})") from exc
        if first["type"] == "model_type" and not first.get("loc"):
            raise DecodeError("the body is JSON but not an object") from exc
        raise DecodeError(f"not a Helox envelope: {describe(exc)}") from exc


def decode(raw: bytes | str, expected: type[P] | None = None) -> Envelope[P]:
    """Decode and validate a whole envelope.

    `expected` restricts the event type (the topic's payload model); None accepts any
    registered type.
    """
    header = decode_header(raw)
    cls = EVENT_TYPES.get(header.type)
    if cls is None:
        raise SchemaVersionError(f"unknown event type {header.type!r}")
    if expected is not None and cls is not expected:
        raise SchemaVersionError(
            f"event type {header.type!r} on a topic that carries {expected.EVENT_TYPE!r}"
        )
    supported = int(cls.SCHEMA_VERSION.split(".")[0])
    if header.major != supported:
        raise SchemaVersionError(
            f"{header.type} schema_version {header.schema_version} has major {header.major}; "
            f"this consumer speaks {cls.SCHEMA_VERSION} (major {supported})"
        )
    payload = cls.model_validate(header.payload)
    fields = {name: getattr(header, name) for name in EnvelopeHeader.model_fields if name != "payload"}
    return _envelope_class(cls).model_construct(**fields, payload=payload)  # type: ignore[valid-type]


def describe(exc: ValidationError, limit: int = 5) -> str:
    """A validation error on one line: `field.path: message` per error (the first `limit`)."""
    errors = exc.errors()
    parts = []
    for err in errors[:limit]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "<root>"
        parts.append(f"{loc}: {err.get('msg')}")
    more = len(errors) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
