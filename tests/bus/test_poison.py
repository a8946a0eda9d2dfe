"""No bad input jams a consumer: every kind of poison entry, on every kind of subscription
the Bus offers, is dead-lettered exactly once with a reason naming the fault and acked; the
consumer goes on with the next valid event and nothing is left pending. Real redis-server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from contracts import DeadLetter, Envelope, RunRequested
from shared.bus import Bus, Delivery
from shared.bus.admin import decode_entry, replay_dead_letter
from shared.bus.wire import DATA_FIELD, DLQ_FIELD_BUDGET, DLQ_TRUNCATED_KEY, body_of, encode_entry, frame
from shared.config import HeloxSettings
from shared.logging import FASTSTREAM_LOGGER, FetchErrorFilter
from tests.contracts.schema_check import envelope_errors

from .helpers import run_request

STREAM = "helox.runs.requested"
JSON = {"content-type": "application/json"}


def _doc(name: str) -> dict[str, Any]:
    return json.loads(run_request(name).model_dump_json())


def _framed(doc: dict[str, Any]) -> dict[bytes, bytes]:
    return {DATA_FIELD: frame(json.dumps(doc).encode(), JSON)}


def _without_event_id() -> dict[bytes, bytes]:
    doc = _doc("no-id")
    del doc["event_id"]
    return _framed(doc)


def _wrong_types() -> dict[bytes, bytes]:
    doc = _doc("wrong")
    doc["payload"]["name"] = 12
    doc["payload"]["config"] = "not an object"
    return _framed(doc)


def _major(version: str, extra: bool = False) -> Callable[[], dict[bytes, bytes]]:
    def build() -> dict[bytes, bytes]:
        doc = _doc(f"v{version}")
        doc["schema_version"] = version
        if extra:
            doc["payload"]["priority"] = "high"  # a field this consumer does not know
            doc["trace"] = {"span": 1}
        return _framed(doc)

    return build


_VALID_FRAME = encode_entry(run_request("template"))[DATA_FIELD]
BIG = b"\xff" + os.urandom(5 * 2**20)


@dataclass(frozen=True)
class Poison:
    name: str
    fields: Callable[[], dict[bytes, bytes]]
    error_type: str | None  # None: accepted and handled
    reason: str = ""


POISON = [
    Poison("json-content-type-non-json-body", lambda: {DATA_FIELD: frame(b"this is not json", JSON)}, "decode",
           "the body is not JSON"),
    Poison("non-utf8-body", lambda: {DATA_FIELD: frame(b'{"a":"\xff\xfe"}', JSON)}, "decode",
           "the body is not UTF-8 (invalid start byte at byte 6)"),
    Poison("json-not-an-object", lambda: {DATA_FIELD: frame(b"[1, 2]", JSON)}, "decode", "JSON but not an object"),
    Poison("no-data-field", lambda: {b"junk": b"hello"}, "decode", "the entry has no __data__ field (fields: junk)"),
    Poison("non-utf8-field-names", lambda: {b"\xff\xfe": b"x", b"ok": b"\xfe"}, "decode",
           "no __data__ field and 1 of its 2 field names are not UTF-8"),
    Poison("truncated-frame", lambda: {DATA_FIELD: _VALID_FRAME[:40]}, "decode",
           "truncated FastStream frame: header 1 of 4 runs past the end of its 40 bytes"),
    Poison("bad-magic", lambda: {DATA_FIELD: b"\x89BIX" + _VALID_FRAME[4:]}, "decode",
           "neither a FastStream frame nor a JSON object: it starts with 89 42 49 58"),
    Poison("frame-version-2", lambda: {DATA_FIELD: _VALID_FRAME[:8] + b"\x00\x02" + _VALID_FRAME[10:]}, "decode",
           "FastStream frame version 2 is not supported"),
    Poison("non-utf8-header", lambda: {DATA_FIELD: frame(b"{}", {"content-type": "application/json", "x": "\xe9"})
                                       .replace("\xe9".encode(), b"\xff\xfe")},
           "decode", "header 2 value is not UTF-8"),
    Poison("5mb-payload", lambda: {DATA_FIELD: frame(BIG, JSON)}, "decode", "the body is not UTF-8"),
    Poison("missing-event-id", _without_event_id, "decode", "not a Helox envelope: event_id: Field required"),
    Poison("wrong-types", _wrong_types, "schema",
           "the RunRequested payload does not match its schema: name: Input should be a valid string; "
           "config: Input should be a valid dictionary"),
    Poison("unknown-major-version", _major("2.0"), "version", "schema_version 2.0 has major 2"),
    Poison("newer-minor-extra-field", _major("1.99", extra=True), None),
]

KINDS = {
    # kind: (subscribe options, entries taken by a dead consumer first so only the reclaimer sees them)
    "reader": ({}, False),
    "batch-reader": ({"max_records": 50}, False),
    "reclaimer": ({}, True),
    "control-group": ({"group": "control"}, False),
}


def _letters(client: redis.Redis) -> list[tuple[str, bytes, Envelope[Any]]]:
    """(DLQ entry id, raw __data__, envelope) of every dead letter."""
    out = []
    for dlq_id, fields in client.xrange("helox.dlq"):
        env = decode_entry(fields)
        assert env is not None and isinstance(env.payload, DeadLetter)
        out.append((dlq_id.decode(), fields[DATA_FIELD], env))
    return out


@pytest.mark.parametrize("kind", list(KINDS))
async def test_every_poison_kind_is_dead_lettered_once_and_the_consumer_carries_on(
    kind: str, settings: HeloxSettings
) -> None:
    options, reclaim = KINDS[kind]
    group = options.get("group", "poison-test")
    client = redis.Redis.from_url(settings.redis_url)
    client.xgroup_create(STREAM, group, id="0", mkstream=True)
    ids: dict[str, str] = {}  # poison name -> entry id
    valid: list[str] = []  # event ids of the valid events that follow each poison
    for p in POISON:
        ids[p.name] = client.xadd(STREAM, p.fields()).decode()
        env = run_request(f"after-{p.name}")
        client.xadd(STREAM, encode_entry(env))
        valid.append(str(env.event_id))
    if reclaim:  # a consumer that read everything and died
        client.xreadgroup(group, "dead-instance", {STREAM: ">"}, count=1000)
        assert client.xpending(STREAM, group)["pending"] == 2 * len(POISON)

    handled: list[str] = []
    bus = Bus(settings, "poison-test", instance="p1")

    async def on(env: Envelope[RunRequested], _d: Delivery) -> None:
        handled.append(str(env.event_id))

    bus.subscribe(RunRequested, on, **options)
    await bus.start()
    try:
        accepted = [p for p in POISON if p.error_type is None]
        want = len(valid) + len(accepted)
        for _ in range(600):
            if len(handled) >= want and len(_letters(client)) >= len(POISON) - len(accepted) \
                    and client.xpending(STREAM, group)["pending"] == 0:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # anything still to come would be a duplicate
    finally:
        await bus.stop()

    assert sorted(set(valid) - set(handled)) == [], "a valid event after a poison entry was not handled"
    assert len(handled) == len(set(handled)) == want
    assert client.xpending(STREAM, group)["pending"] == 0
    letters = _letters(client)
    by_id: dict[str, list[tuple[str, bytes, Envelope[Any]]]] = {}
    for dlq_id, raw, env in letters:
        by_id.setdefault(env.payload.original_id, []).append((dlq_id, raw, env))
    for p in POISON:
        got = by_id.get(ids[p.name], [])
        if p.error_type is None:
            assert got == [], f"{p.name} was dead-lettered: {got[0][2].payload.error if got else ''}"
            continue
        assert len(got) == 1, f"{p.name}: {len(got)} dead letters"
        _dlq_id, raw, env = got[0]
        letter = env.payload
        assert (letter.error_type, letter.group, letter.original_stream) == (p.error_type, group, STREAM), p.name
        assert p.reason in letter.error, f"{p.name}: {letter.error!r}"
        assert letter.delivery_count == (2 if reclaim else 1)
        assert envelope_errors(body_of({DATA_FIELD: raw})) == [], p.name  # the dead letter is valid by the schema
        assert len(raw) < DLQ_FIELD_BUDGET + 16 * 1024, f"{p.name}: a {len(raw)}-byte dead letter"
    assert len(letters) == len(POISON) - 1
    big_id, _raw, big = by_id[ids["5mb-payload"]][0]
    record = json.loads(big.payload.original_fields[DLQ_TRUNCATED_KEY])
    original = frame(BIG, JSON)
    assert record["__data__"] == {"bytes": len(original), "sha256": hashlib.sha256(original).hexdigest()}
    with pytest.raises(ValueError, match="cannot be replayed"):
        replay_dead_letter(client, "helox.", big_id)  # a cut copy never goes back on the stream


async def test_a_replayed_dead_letter_is_framed_like_a_bus_entry_and_handled(settings: HeloxSettings) -> None:
    """`helox dlq replay`: the original entry goes back with the Bus's headers and is handled."""
    client = redis.Redis.from_url(settings.redis_url)
    handled: list[str] = []
    bus = Bus(settings, "poison-test", instance="p1")
    fail = {"on": True}

    async def on(env: Envelope[RunRequested], _d: Delivery) -> None:
        if fail["on"]:
            raise RuntimeError("not yet")
        handled.append(str(env.event_id))

    bus.subscribe(RunRequested, on)
    await bus.start()
    try:
        env = run_request("replay-me")
        client.xadd(STREAM, encode_entry(env))
        for _ in range(400):
            if client.xlen("helox.dlq"):
                break
            await asyncio.sleep(0.05)
        (dlq_id, _fields), = client.xrange("helox.dlq")
        fail["on"] = False
        new_id = replay_dead_letter(client, "helox.", dlq_id.decode())
        assert client.xlen("helox.dlq") == 0
        (_id, fields), = client.xrange(STREAM, min=new_id, max=new_id)
        assert fields == encode_entry(env)  # the same frame, headers included
        for _ in range(200):
            if handled:
                break
            await asyncio.sleep(0.05)
        assert handled == [str(env.event_id)]
    finally:
        await bus.stop()


def test_fetch_errors_while_redis_is_away_are_one_line_per_interval() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("helox.test.fetch")
    logger.propagate = False
    logger.addHandler(Keep())
    f = FetchErrorFilter(interval_s=0.2)
    logger.addFilter(f)
    err = ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
    for _ in range(16):  # eight subscribers, two retries each within one interval
        logger.error("Message fetch error", exc_info=err)
    assert len(records) == 1
    assert records[0].exc_info is None and records[0].levelno == logging.WARNING
    assert records[0].getMessage() == f"Redis read failed, retrying: ConnectionError: {err}"
    import time

    time.sleep(0.25)
    logger.error("Message fetch error", exc_info=err)
    assert len(records) == 2 and records[1].getMessage().endswith("(15 similar held back)")
    logger.critical("Consumer group `g` for stream `s` no longer exists. The stream was likely deleted or flushed. "
                    "Stopping subscriber — restart the application to recreate the group.", exc_info=err)
    assert records[2].exc_info is None and "The Helox bus recreates it." in records[2].getMessage()
    assert "restart the application" not in records[2].getMessage()
    logger.warning("something else")
    assert records[3].getMessage() == "something else"
    assert FASTSTREAM_LOGGER == "faststream.access.redis"
