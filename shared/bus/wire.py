"""How an envelope sits in a Redis stream entry.

One field, ``__data__``, in FastStream's default binary message format (headers +
body), so any FastStream RedisBroker subscriber (Cyrex's included) reads Helox events
with no configuration. The body is the envelope's JSON.
"""

from __future__ import annotations

from faststream.redis.message import DATA_KEY
from faststream.redis.parser.binary import BinaryMessageFormatV1, BinaryWriter, FastStreamMessageVersion

from contracts import Envelope
from contracts.codec import encode

DATA_FIELD = DATA_KEY.encode()


def encode_entry(env: Envelope) -> dict[bytes, bytes]:
    """Stream-entry fields for an envelope (synchronous: the outbox thread calls it)."""
    headers = {
        "correlation_id": str(env.correlation_id or env.event_id),
        "content-type": "application/json",
        "message_id": str(env.event_id),
        "helox-type": env.type,
    }
    return {DATA_FIELD: frame(encode(env), headers)}


def frame(body: bytes, headers: dict[str, str]) -> bytes:
    """FastStream BinaryMessageFormatV1 framing (same bytes as its async encoder)."""
    hw = BinaryWriter()
    for key, value in headers.items():
        hw.write_string(key)
        hw.write_string(value)
    header_bytes = hw.get_bytes()
    w = BinaryWriter()
    w.write(BinaryMessageFormatV1.IDENTITY_HEADER)
    w.write_short(FastStreamMessageVersion.v1.value)
    headers_start = len(w.data) + 8
    w.write_int(headers_start)
    w.write_int(2 + headers_start + len(header_bytes))
    w.write_short(len(headers))
    w.write(header_bytes)
    w.write(body)
    return w.get_bytes()


def body_of(fields: dict[bytes, bytes]) -> bytes:
    """The envelope bytes of an entry (whatever framing it came in)."""
    raw = fields.get(DATA_FIELD)
    if raw is None:
        return b""
    body, _headers = BinaryMessageFormatV1.parse(raw)
    return body


def printable_fields(fields: dict[bytes, bytes]) -> dict[str, str]:
    """Entry fields as text for the dead-letter record (undecodable bytes replaced)."""
    out: dict[str, str] = {}
    for k, v in fields.items():
        key = k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)
        if isinstance(v, bytes):
            if key == DATA_KEY:
                body = body_of(fields)
                out[key] = body.decode("utf-8", "replace")
            else:
                out[key] = v.decode("utf-8", "replace")
        else:
            out[key] = str(v)
    return out
