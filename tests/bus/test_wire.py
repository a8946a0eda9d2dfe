"""contracts/WIRE.md is exact: frames built from it by hand (struct, no FastStream) are
consumed by a running Bus, the Bus's entries parse by hand from it, and FastStream writes
the same bytes."""

from __future__ import annotations

import asyncio
import json
import re
import struct
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from faststream.redis.parser.binary import BinaryMessageFormatV1

from contracts import DataPrepProgress, Envelope, TrainerAction, TrainerCommand, decode
from shared.bus import Bus, Delivery
from shared.bus.wire import (
    DATA_FIELD,
    DLQ_FIELD_BUDGET,
    DLQ_TRUNCATED_KEY,
    WireError,
    dead_letter_fields,
    frame,
    parse_frame,
    read_entry,
)
from shared.config import HeloxSettings
from tests.contracts.schema_check import envelope_errors, header_errors

WIRE = Path(__file__).resolve().parents[2] / "contracts" / "WIRE.md"


def _doc() -> str:
    return WIRE.read_text(encoding="utf-8")


def _documented_example() -> bytes:
    """The hex dump of section 2, as bytes."""
    block = re.search(r"```text\n(0000 .*?)```", _doc(), re.S)
    assert block, "WIRE.md lost its example hex dump"
    out = bytearray()
    for line in block.group(1).splitlines():
        out += bytes.fromhex(line[6:54])
    return bytes(out)


def _documented_recipe() -> dict[str, Any]:
    """Run section 6's Python (standard library only) and return its names."""
    code = re.search(r"## 6\..*?```python\n(.*?)```", _doc(), re.S)
    assert code, "WIRE.md lost its section 6 recipe"
    assert "faststream" not in code.group(1).lower()
    names: dict[str, Any] = {}
    exec(compile(code.group(1), str(WIRE), "exec"), names)  # the document's own example, run as written
    return names


def test_the_documented_example_is_the_frame_the_bus_writes() -> None:
    assert _documented_example() == frame(b'{"k":1}', {"content-type": "application/json"})
    assert parse_frame(_documented_example()) == (b'{"k":1}', {"content-type": "application/json"})


def test_the_documented_envelope_example_is_valid_and_decodes() -> None:
    block = re.search(r"## 4\..*?```json\n(.*?)```", _doc(), re.S)
    assert block, "WIRE.md lost its envelope example"
    doc = json.loads(block.group(1))
    assert envelope_errors(doc) == []
    env = decode(json.dumps(doc), TrainerAction)
    assert env.payload == TrainerAction(action="rollback", step=120, reason="loss spike")


async def test_faststream_writes_and_reads_the_documented_frame() -> None:
    headers = {"correlation_id": "c-1", "content-type": "application/json", "helox-type": "TrainerCommand"}
    theirs = await BinaryMessageFormatV1.encode(
        message=b'{"command":"pause"}', reply_to=None, correlation_id="c-1",
        headers={"content-type": "application/json", "helox-type": "TrainerCommand"},
    )
    assert theirs == frame(b'{"command":"pause"}', headers)
    hand = _documented_recipe()["frame"](b'{"command":"pause"}', headers)
    assert hand == theirs
    assert BinaryMessageFormatV1.parse(hand) == (b'{"command":"pause"}', headers)


def _padded_frame(body: bytes, headers: dict[str, str]) -> bytes:
    """A frame by the table of section 2 with 4 spare bytes before the header count and 3
    after the headers: readers seek to headers_start and data_start."""
    hdr = b""
    for k, v in headers.items():
        for s in (k.encode(), v.encode()):
            hdr += struct.pack(">H", len(s)) + s
    headers_start = 18 + 4
    data_start = headers_start + 2 + len(hdr) + 3
    return (
        b"\x89BIN\r\n\x1a\n" + struct.pack(">H", 1) + struct.pack(">I", headers_start) + struct.pack(">I", data_start)
        + b"\0" * 4 + struct.pack(">H", len(headers)) + hdr + b"\0" * 3 + body
    )


async def _bus_with(settings: HeloxSettings, payload: type, got: list[Envelope[Any]]) -> Bus:
    bus = Bus(settings, "wire-test", instance="w1")

    async def on(env: Envelope[Any], _d: Delivery) -> None:
        got.append(env)

    bus.subscribe(payload, on)
    await bus.start()
    return bus


async def _wait(predicate: Any, timeout: float = 15.0, what: str = "condition") -> None:
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_frame_built_by_hand_from_the_doc_is_consumed_by_the_bus(settings: HeloxSettings) -> None:
    recipe = _documented_recipe()
    got: list[Envelope[Any]] = []
    bus = await _bus_with(settings, TrainerCommand, got)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        client.xadd("helox.train.commands", {"__data__": recipe["value"]})
        second = dict(recipe["envelope"], event_id=str(uuid.uuid4()), payload={"command": "pause", "reason": "padded"})
        client.xadd("helox.train.commands", {
            "__data__": _padded_frame(json.dumps(second).encode(), {"content-type": "application/json"})})
        plain = dict(recipe["envelope"], event_id=str(uuid.uuid4()), payload={"command": "resume"})
        client.xadd("helox.train.commands", {"__data__": json.dumps(plain).encode()})  # rule 3: bare JSON
        await _wait(lambda: len(got) == 3, what="three hand-made events")
        assert [str(e.event_id) for e in got] == [recipe["event_id"], second["event_id"], plain["event_id"]]
        assert got[0].payload == TrainerCommand(command="checkpoint", reason="by hand")
        assert got[1].payload.reason == "padded" and got[2].payload.command == "resume"
        await _wait(lambda: client.xpending("helox.train.commands", "wire-test")["pending"] == 0, what="acks")
        assert client.xlen("helox.dlq") == 0
    finally:
        await bus.stop()


async def test_a_bus_published_entry_parses_by_hand_from_the_doc(settings: HeloxSettings) -> None:
    bus = Bus(settings, "wire-test", instance="w1")
    await bus.connect()
    try:
        one = await bus.publish(DataPrepProgress(stage="ingest", fraction=0.5), run_id="r1")
        (many,) = await bus.publish_many([DataPrepProgress(stage="tokenize", fraction=1.0)], run_id="r1")
    finally:
        await bus.broker.stop()
    rows = redis.Redis.from_url(settings.redis_url).xrange("helox.data.progress")
    assert len(rows) == 2
    unframe = _documented_recipe()["unframe"]
    for (_id, fields), event_id in zip(rows, (one.event_id, many), strict=True):
        assert list(fields) == [b"__data__"]
        raw = fields[b"__data__"]
        # Section 2's table, field by field.
        assert raw[:8] == bytes.fromhex("89 42 49 4e 0d 0a 1a 0a")
        version, headers_start, data_start, count = struct.unpack_from(">HIIH", raw, 8)
        assert (version, headers_start, count) == (1, 18, 4)
        pos, headers = 20, {}
        for _ in range(count):
            (n,) = struct.unpack_from(">H", raw, pos)
            key = raw[pos + 2:pos + 2 + n].decode()
            pos += 2 + n
            (n,) = struct.unpack_from(">H", raw, pos)
            headers[key] = raw[pos + 2:pos + 2 + n].decode()
            pos += 2 + n
        assert data_start == pos  # the body follows the headers
        body = raw[data_start:]
        assert unframe(raw) == (body, headers)
        doc = json.loads(body)
        assert headers == {"correlation_id": str(event_id), "content-type": "application/json",
                           "message_id": str(event_id), "helox-type": "DataPrepProgress"}
        assert doc["event_id"] == str(event_id) and doc["type"] == "DataPrepProgress" and doc["run_id"] == "r1"
        assert envelope_errors(body) == [] and header_errors(headers) == []


FRAME = frame(b'{"k":1}', {"content-type": "application/json", "message_id": "m"})


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"junk": b"x", b"more": b"y"}, "the entry has no __data__ field (fields: junk, more)"),
        ({b"\xff\xfe": b"x", b"ok": b"y"}, "1 of its 2 field names are not UTF-8"),
        ({}, "the entry has no fields"),
        ({DATA_FIELD: b""}, "__data__ is empty"),
        ({DATA_FIELD: FRAME[:5]}, "truncated FastStream frame: 5 bytes"),
        ({DATA_FIELD: FRAME[:17]}, "truncated FastStream frame: 17 bytes"),
        ({DATA_FIELD: FRAME[:30]}, "truncated FastStream frame: header 1 of 2 runs past the end of its 30 bytes"),
        ({DATA_FIELD: FRAME[:10] + struct.pack(">II", 18, 9999) + FRAME[18:]}, "data_start 9999 is past the end"),
        ({DATA_FIELD: FRAME[:10] + struct.pack(">II", 18, 20) + FRAME[18:]}, "data_start 20 points into the headers"),
        ({DATA_FIELD: FRAME[:10] + struct.pack(">II", 4, 20) + FRAME[18:]}, "headers_start 4 points into"),
        ({DATA_FIELD: FRAME[:8] + b"\x00\x02" + FRAME[10:]}, "FastStream frame version 2 is not supported"),
        ({DATA_FIELD: b"\x89BIX\r\n\x1a\n" + FRAME[8:]}, "neither a FastStream frame nor a JSON object: it starts with 89 42 49 58"),
        ({DATA_FIELD: frame(b"{}", {"k\xe9": "v"}).replace("k\xe9".encode(), b"k\xff")}, "header 1 key is not UTF-8"),
    ],
    ids=["no-data", "non-utf8-names", "empty-entry", "empty-data", "cut-in-magic", "cut-in-offsets",
         "cut-in-headers", "data-past-end", "data-inside-headers", "headers-start-low", "version-2", "bad-magic",
         "header-not-utf8"],
)
def test_read_entry_names_each_fault(fields: dict[bytes, bytes], reason: str) -> None:
    with pytest.raises(WireError) as err:
        read_entry(fields)
    assert reason in str(err.value)


def test_read_entry_accepts_frames_bare_json_and_ignores_other_fields() -> None:
    assert read_entry({DATA_FIELD: FRAME, b"extra": b"\xff"}) == (b'{"k":1}', {"content-type": "application/json",
                                                                             "message_id": "m"})
    assert read_entry({DATA_FIELD: b' \n{"k":1}'}) == (b' \n{"k":1}', {})
    assert read_entry({DATA_FIELD: _padded_frame(b"{}", {"a": "b"})}) == (b"{}", {"a": "b"})
    assert read_entry({DATA_FIELD: frame(b"{}", {"a": "1", "a ": "2", "b": "x"})})[1] == {"a": "1", "a ": "2", "b": "x"}


def test_a_dead_letter_keeps_a_bounded_prefix_and_the_original_size_and_digest() -> None:
    import hashlib

    big = frame(b"\xff" + b"x" * (5 * 2**20), {"content-type": "application/json"})
    out = dead_letter_fields({DATA_FIELD: big, b"note": b"kept"})
    assert len(out["__data__"].encode()) <= DLQ_FIELD_BUDGET
    assert out["__data__"].startswith("\\xffxxx")  # the body, undecodable bytes escaped
    record = json.loads(out[DLQ_TRUNCATED_KEY])
    assert record == {"__data__": {"bytes": len(big), "sha256": hashlib.sha256(big).hexdigest()},
                      "note": {"bytes": 4, "sha256": hashlib.sha256(b"kept").hexdigest()}}
    assert out["note"] == ""  # the budget was spent on __data__
    small = dead_letter_fields({DATA_FIELD: FRAME, b"\xff": b"\xfe"})
    assert small == {"__data__": '{"k":1}', "\\xff": "\\xfe"}  # nothing cut: no record
    many = dead_letter_fields({f"f{i}".encode(): b"v" for i in range(100)})
    assert len(many) == 64 + 1 and json.loads(many[DLQ_TRUNCATED_KEY]) == {"dropped_fields": 36}
