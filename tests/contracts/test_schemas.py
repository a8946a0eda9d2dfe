"""The published schemas (asyncapi.json) agree with what goes on the wire and what consumers
accept: required envelope fields, non-finite floats as strings, the frame headers."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import pytest

from contracts import EVENT_TYPES, Producer, TrainingMetrics, decode, encode
from contracts.asyncapi import NON_FINITE, PROVENANCE_DOCUMENT, WIRE_DOCUMENT, envelope_required
from contracts.codec import DecodeError, encode_new, envelope
from contracts.envelope import EnvelopeHeader
from shared.bus.admin import replay_headers
from shared.bus.wire import entry, parse_frame

from .schema_check import document, envelope_errors, header_errors, sample

REPO = Path(__file__).resolve().parents[2]
PRODUCER = Producer(service="test", instance="pytest")
TYPES = sorted(EVENT_TYPES)


@pytest.mark.parametrize("event_type", TYPES)
@pytest.mark.parametrize("non_finite", [False, True], ids=["finite", "non-finite"])
def test_every_event_as_the_bus_writes_it_validates_and_decodes(event_type: str, non_finite: bool) -> None:
    payload = sample(EVENT_TYPES[event_type], non_finite=non_finite)
    env = envelope(payload, producer=PRODUCER, run_id="r1")
    _event_id, fast = encode_new(payload, producer_json=PRODUCER.model_dump_json().encode(), run_id="r1")
    for body in (encode(env), fast):
        assert envelope_errors(body) == [], body[:300]
        back = decode(body, EVENT_TYPES[event_type])
        assert back.payload.model_dump_json() == payload.model_dump_json()
    fields = entry(encode(env), str(env.event_id), str(env.correlation_id), env.type)
    _body, headers = parse_frame(fields[b"__data__"])
    assert header_errors(headers) == []


def test_non_finite_floats_are_the_documented_strings_in_schema_and_wire() -> None:
    m = TrainingMetrics(step=1, tokens_seen=8, loss=math.nan, lr=math.inf, grad_norm=-math.inf, seq_len=8, batch_size=1)
    body = encode(envelope(m, producer=PRODUCER))
    wire = json.loads(body)["payload"]
    assert (wire["loss"], wire["lr"], wire["grad_norm"]) == ("NaN", "Infinity", "-Infinity")
    assert envelope_errors(body) == []
    loss = document()["components"]["schemas"]["TrainingMetrics"]["properties"]["loss"]
    assert loss["oneOf"] == [{"type": "number"}, {"type": "string", "enum": list(NON_FINITE)}]
    # A bounded float admits only the infinities its bound lets through, as the consumer does.
    schema = document()["components"]["schemas"]
    bounded = [
        (name, field, prop)
        for name, s in schema.items()
        for field, prop in (s.get("properties") or {}).items()
        if name in EVENT_TYPES and "oneOf" in prop and prop["oneOf"][0].get("minimum") is not None
    ]
    assert bounded, "expected an event with a lower-bounded float field (ge=...)"
    name, field, prop = bounded[0]
    assert prop["oneOf"][1]["enum"] == ["Infinity"]
    doc = json.loads(encode(envelope(sample(EVENT_TYPES[name]), producer=PRODUCER)))
    doc["payload"][field] = "Infinity"
    assert envelope_errors(doc) == []
    decode(json.dumps(doc), EVENT_TYPES[name])
    doc["payload"][field] = "NaN"
    assert envelope_errors(doc)
    with pytest.raises(ValueError):
        decode(json.dumps(doc), EVENT_TYPES[name])


def test_the_envelope_schema_requires_what_consumers_require() -> None:
    required = [n for n, f in EnvelopeHeader.model_fields.items() if f.is_required()]
    assert {"event_id", "occurred_at", "type", "schema_version", "producer", "payload"} <= set(required)
    assert envelope_required() == required
    for event_type in TYPES:
        schema = document()["components"]["schemas"][f"{event_type}Envelope"]
        assert schema["required"] == required


@pytest.mark.parametrize("missing", ["event_id", "occurred_at", "producer", "payload", "schema_version"])
def test_an_envelope_lacking_a_required_field_fails_the_schema_and_the_consumer(missing: str) -> None:
    doc = json.loads(encode(envelope(sample(EVENT_TYPES["RunRequested"]), producer=PRODUCER)))
    del doc[missing]
    assert any(missing in e for e in envelope_errors(doc, "RunRequested"))
    with pytest.raises(DecodeError, match=missing):
        decode(json.dumps(doc))


def test_a_wrong_event_id_type_fails_both() -> None:
    doc = json.loads(encode(envelope(sample(EVENT_TYPES["RunRequested"]), producer=PRODUCER)))
    doc["event_id"] = 12
    assert envelope_errors(doc)
    with pytest.raises(DecodeError, match="event_id"):
        decode(json.dumps(doc))


def test_headers_schema_matches_the_bus_and_dlq_replay() -> None:
    env = envelope(sample(EVENT_TYPES["RunRequested"]), producer=PRODUCER)
    bus = parse_frame(entry(encode(env), str(env.event_id), str(env.correlation_id), env.type)[b"__data__"])[1]
    replayed = replay_headers(encode(env))
    assert replayed == bus  # replay of a readable body writes what the Bus wrote
    unreadable = replay_headers(b"{not json")
    assert unreadable == {"content-type": "application/json"}
    for headers in (bus, replayed, unreadable, {**bus, "reply_to": "x"}):
        assert header_errors(headers) == []
    assert header_errors({"message_id": str(uuid.uuid4())})  # content-type is required
    assert header_errors({"content-type": "text/plain"})


def test_the_document_points_to_the_wire_and_provenance_docs() -> None:
    doc = document()
    assert WIRE_DOCUMENT in doc["info"]["description"]
    assert doc["x-wire-format"]["document"] == WIRE_DOCUMENT
    assert doc["x-wire-format"]["provenance"] == PROVENANCE_DOCUMENT
    assert (REPO / WIRE_DOCUMENT).is_file() and (REPO / PROVENANCE_DOCUMENT).is_file()
