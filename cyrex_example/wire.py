"""Helox's wire format, written from contracts/WIRE.md (no Helox internals, no FastStream).

A stream entry has one field, `__data__`, holding a FastStream `BinaryMessageFormatV1` frame:

    magic 89 42 49 4e 0d 0a 1a 0a | version u16 = 1 | headers_start u32 = 18 | data_start u32
    | header count u16 | (u16 length + UTF-8 key, u16 length + UTF-8 value) per header | body

all integers unsigned big-endian; the body (the envelope JSON) runs to the end. A `__data__`
value that is the envelope JSON itself (starts with `{`) is read too (WIRE.md section 3, rule 3).

`read_body` is strict: anything that breaks a rule of WIRE.md section 3 raises `WireError`
with the reason, so the consumer can log it and ack the entry.
"""

from __future__ import annotations

import struct

from contracts import Envelope, Event, encode

MAGIC = b"\x89BIN\r\n\x1a\n"
DATA_FIELD = b"__data__"
_FIXED = 18  # magic (8) + version (2) + headers_start (4) + data_start (4)
_JSON_WS = b" \t\r\n"


class WireError(ValueError):
    """A stream entry that is not a Helox frame; the message says which rule it breaks."""


def frame(body: bytes, headers: dict[str, str]) -> bytes:
    """A FastStream binary frame: the fixed part, the headers, then the body."""
    parts = []
    for key, value in headers.items():
        for text in (key, value):
            raw = text.encode()
            if len(raw) > 0xFFFF:
                raise WireError(f"header {key!r} is longer than 65535 bytes")
            parts.append(struct.pack(">H", len(raw)) + raw)
    header_list = b"".join(parts)
    return MAGIC + struct.pack(">HIIH", 1, _FIXED, _FIXED + 2 + len(header_list), len(headers)) + header_list + body


def unframe(raw: bytes) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a frame; raises WireError for a truncated or inconsistent one."""
    if len(raw) < _FIXED:
        raise WireError(f"truncated FastStream frame: {len(raw)} bytes, its fixed part alone is {_FIXED}")
    (version,) = struct.unpack_from(">H", raw, 8)
    if version != 1:
        raise WireError(f"FastStream frame version {version} is not supported")
    headers_start, data_start = struct.unpack_from(">II", raw, 10)
    if headers_start < _FIXED:
        raise WireError(f"bad FastStream frame: headers_start {headers_start} is inside the fixed part")
    if headers_start + 2 > len(raw):
        raise WireError(f"truncated FastStream frame: headers_start {headers_start} is past its {len(raw)} bytes")
    (count,) = struct.unpack_from(">H", raw, headers_start)
    pos, headers = headers_start + 2, {}
    for i in range(count):
        kv = []
        for what in ("key", "value"):
            if pos + 2 > len(raw):
                raise WireError(f"truncated FastStream frame: header {i} of {count} runs past the end of its "
                                f"{len(raw)} bytes")
            (n,) = struct.unpack_from(">H", raw, pos)
            if pos + 2 + n > len(raw):
                raise WireError(f"truncated FastStream frame: header {i} of {count} runs past the end of its "
                                f"{len(raw)} bytes")
            try:
                kv.append(raw[pos + 2:pos + 2 + n].decode("utf-8"))
            except UnicodeDecodeError:
                raise WireError(f"FastStream frame header {i} {what} is not UTF-8") from None
            pos += 2 + n
        headers[kv[0]] = kv[1]  # a repeated key: the last one wins
    if data_start > len(raw):
        raise WireError(f"truncated FastStream frame: data_start {data_start} is past its {len(raw)} bytes")
    if data_start < pos:
        raise WireError(f"bad FastStream frame: data_start {data_start} is inside the header list (ends at {pos})")
    return raw[data_start:], headers


def read_body(fields: dict[bytes, bytes]) -> bytes:
    """The envelope JSON of a stream entry (WIRE.md section 3, rules 1-4, in order)."""
    if DATA_FIELD not in fields:
        names = sorted(k.decode("utf-8", "replace") for k in fields)
        raise WireError(f"the entry has no __data__ field (fields: {names})")
    raw = fields[DATA_FIELD]
    if raw.startswith(MAGIC):
        return unframe(raw)[0]
    if raw.lstrip(_JSON_WS).startswith(b"{"):
        return raw
    raise WireError(f"__data__ is neither a FastStream frame nor a JSON object: it starts with {raw[:8]!r}")


def entry_fields(env: Envelope[Event]) -> dict[bytes, bytes]:
    """The stream entry of an envelope: `__data__` = frame(envelope JSON, the four headers)."""
    event_id = str(env.event_id)
    headers = {"content-type": "application/json", "message_id": event_id,
               "correlation_id": str(env.correlation_id or event_id), "helox-type": env.type}
    return {DATA_FIELD: frame(encode(env), headers)}
