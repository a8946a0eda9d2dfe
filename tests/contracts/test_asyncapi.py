"""The committed AsyncAPI document (contracts/asyncapi.json) is fresh and complete."""

from __future__ import annotations

import json
from typing import Any

from faststream.redis.parser.binary import BinaryMessageFormatV1
from faststream.specification.asyncapi.v3_0_0.schema import ApplicationSchema

from contracts import Producer, TrainingMetrics
from contracts.asyncapi import DOCUMENT_PATH, REGENERATE, WIRE_HEADERS, generate, main, render
from contracts.codec import envelope
from contracts.services import PARTICIPANTS
from contracts.topics import TOPICS
from shared.bus.wire import DATA_FIELD, encode_entry


def committed() -> dict[str, Any]:
    return json.loads(DOCUMENT_PATH.read_text(encoding="utf-8"))


def test_committed_document_is_fresh() -> None:
    assert DOCUMENT_PATH.exists(), f"{DOCUMENT_PATH} is missing: generate it with `{REGENERATE}`"
    assert DOCUMENT_PATH.read_text(encoding="utf-8") == render(), (
        f"{DOCUMENT_PATH} is stale (the contracts changed): regenerate it with `{REGENERATE}`"
    )
    assert main(["--check"]) == 0
    assert render() == render()  # deterministic


def test_every_topic_is_a_channel_with_its_stream_and_retention() -> None:
    doc = committed()
    assert doc["asyncapi"] == "3.0.0"
    by_key = {c["x-topic-key"]: c for c in doc["channels"].values()}
    assert set(by_key) == set(TOPICS)
    for key, t in TOPICS.items():
        channel = by_key[key]
        assert channel["address"] == f"helox.{key}"
        assert channel["x-retention"] == {"kind": t.retention.kind, "maxlen": t.retention.maxlen}
        event = t.payload.EVENT_TYPE
        assert channel["messages"] == {event: {"$ref": f"#/components/messages/{event}"}}
        message = doc["components"]["messages"][event]
        assert message["x-schema-version"] == t.payload.SCHEMA_VERSION
        envelope_schema = resolve(doc, message["payload"]["$ref"])
        assert envelope_schema["properties"]["type"]["const"] == event
        assert resolve(doc, envelope_schema["properties"]["payload"]["$ref"])["title"] == event
        assert set(envelope_schema["required"]) >= {"type", "schema_version", "producer", "payload"}
    assert generate("acme.")["channels"]["train_metrics"]["address"] == "acme.train.metrics"


def test_operations_say_who_publishes_and_consumes() -> None:
    doc = committed()
    ops = doc["operations"]
    expected = {
        (p.name, action, key)
        for p in PARTICIPANTS.values()
        for action, keys in (("send", p.publishes), ("receive", p.consumes))
        for key in keys
    }
    actual = {
        (op["x-participant"], op["action"], resolve(doc, op["channel"]["$ref"])["x-topic-key"]) for op in ops.values()
    }
    assert actual == expected
    assert ("trainer", "send", "train.metrics") in actual
    assert ("cyrex", "receive", "export.model-ready") in actual
    for op in ops.values():
        if op["action"] == "receive":
            assert op["x-consumer-group"] == op["x-participant"]
        for m in op["messages"]:
            resolve(doc, m["$ref"])
    channel = next(c for c in doc["channels"].values() if c["x-topic-key"] == "train.metrics")
    assert channel["x-publishers"] == ["trainer"] and channel["x-consumers"] == ["health-monitor"]


def test_every_reference_resolves_and_faststream_reads_the_document() -> None:
    doc = committed()
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    assert refs
    for ref in refs:
        resolve(doc, ref)
    ApplicationSchema.model_validate(doc)  # FastStream's AsyncAPI 3.0 model


def test_documented_headers_are_the_ones_the_bus_writes() -> None:
    env = envelope(
        TrainingMetrics(step=1, tokens_seen=1, loss=1.0, lr=0.1, grad_norm=1.0, seq_len=8, batch_size=1),
        producer=Producer(service="trainer", instance="t1"),
    )
    fields = encode_entry(env)
    assert list(fields) == [DATA_FIELD] and DATA_FIELD == b"__data__"
    _body, headers = BinaryMessageFormatV1.parse(fields[DATA_FIELD])
    assert set(headers) == set(WIRE_HEADERS)
    assert headers["helox-type"] == "TrainingMetrics" and headers["message_id"] == str(env.event_id)


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, f"unresolved $ref {ref}"
        node = node[part]
    return node
