"""How an envelope sits in a Redis stream entry.

One field, ``__data__``, in FastStream's default binary message format (headers +
body), so any FastStream RedisBroker subscriber (Cyrex's included) reads Helox events
with no configuration. The body is the envelope's JSON.
"""

from __future__ import annotations

from struct import pack

from faststream.redis.message import DATA_KEY
from faststream.redis.parser.binary import BinaryMessageFormatV1, FastStreamMessageVersion

from contracts import Envelope
from contracts.codec import encode

DATA_FIELD = DATA_KEY.encode()


def encode_entry(env: Envelope) -> dict[bytes, bytes]:
    """Stream-entry fields for an envelope (synchronous: the outbox thread calls it)."""
    return entry(encode(env), str(env.event_id), str(env.correlation_id or env.event_id), env.type)


def entry(body: bytes, event_id: str, correlation_id: str, event_type: str) -> dict[bytes, bytes]:
    """Stream-entry fields for envelope JSON `body`."""
    headers = {
        "correlation_id": correlation_id,
        "content-type": "application/json",
        "message_id": event_id,
        "helox-type": event_type,
    }
    return {DATA_FIELD: frame(body, headers)}


_MAGIC = BinaryMessageFormatV1.IDENTITY_HEADER + pack(">H", FastStreamMessageVersion.v1.value)
_HEADERS_START = len(_MAGIC) + 8


def frame(body: bytes, headers: dict[str, str]) -> bytes:
    """FastStream BinaryMessageFormatV1 framing: the same bytes as its (async) encoder, built
    with struct in one join because this runs for every published event."""
    parts = []
    for key, value in headers.items():
        k, v = key.encode(), value.encode()
        parts += (pack(">H", len(k)), k, pack(">H", len(v)), v)
    header_bytes = b"".join(parts)
    return b"".join((
        _MAGIC,
        pack(">II", _HEADERS_START, 2 + _HEADERS_START + len(header_bytes)),
        pack(">H", len(headers)),
        header_bytes,
        body,
    ))


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
