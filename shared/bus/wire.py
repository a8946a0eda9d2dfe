"""How an envelope sits in a Redis stream entry: the byte layout is contracts/WIRE.md.

One field, ``__data__``, in FastStream's binary message format (a frame: magic, version,
offsets, headers, body), so any FastStream RedisBroker subscriber (Cyrex's included) reads
Helox events with no configuration. The body is the envelope's JSON.

Writing uses `frame` (struct, the same bytes as FastStream's encoder). Reading uses
`read_entry`, which follows WIRE.md strictly and says which rule an entry breaks
(`WireError`): FastStream's own parser never fails, it falls back to treating any bytes it
cannot parse as the body, which turns "truncated frame" into "invalid JSON".
"""

from __future__ import annotations

import hashlib
import json
from struct import pack, unpack_from

from contracts import Envelope
from contracts.codec import encode

DATA_FIELD = b"__data__"
"""The one field of a Helox entry (FastStream's `faststream.redis.message.DATA_KEY`)."""

MAGIC = b"\x89BIN\r\n\x1a\n"
"""First 8 bytes of a frame (FastStream's BinaryMessageFormatV1.IDENTITY_HEADER)."""
FRAME_VERSION = 1
_FIXED = len(MAGIC) + 2 + 4 + 4  # magic, u16 version, u32 headers_start, u32 data_start
_HEADERS_START = _FIXED  # where every writer puts the u16 header count
_PREFIX = MAGIC + pack(">H", FRAME_VERSION)

CONTENT_TYPE = "application/json"

DLQ_FIELD_BUDGET = 64 * 1024
"""At most this many bytes of an entry's field values (as JSON string content) are kept in a dead letter."""
DLQ_MAX_FIELDS = 64
DLQ_TRUNCATED_KEY = "helox-dlq-truncated"
"""A dead letter's `original_fields` key present when the copy is partial: JSON
{field: {"bytes": original size, "sha256": hex of the original bytes}} for every field cut
short or left out, plus "dropped_fields" (fields past the first DLQ_MAX_FIELDS)."""


class WireError(ValueError):
    """The entry is not in the Helox wire format; the message names the rule it breaks."""


def encode_entry(env: Envelope) -> dict[bytes, bytes]:
    """Stream-entry fields for an envelope (synchronous: the outbox thread calls it)."""
    return entry(encode(env), str(env.event_id), str(env.correlation_id or env.event_id), env.type)


def headers_for(event_id: str, correlation_id: str, event_type: str) -> dict[str, str]:
    """The frame headers the Bus writes (contracts/WIRE.md, "Headers")."""
    return {
        "correlation_id": correlation_id,
        "content-type": CONTENT_TYPE,
        "message_id": event_id,
        "helox-type": event_type,
    }


def entry(body: bytes, event_id: str, correlation_id: str, event_type: str) -> dict[bytes, bytes]:
    """Stream-entry fields for envelope JSON `body`."""
    return {DATA_FIELD: frame(body, headers_for(event_id, correlation_id, event_type))}


def frame(body: bytes, headers: dict[str, str]) -> bytes:
    """A FastStream binary frame: the same bytes as its (async) encoder for ASCII headers,
    built with struct in one join because this runs for every published event. Lengths are
    byte counts (FastStream's encoder writes character counts, wrong for non-ASCII)."""
    parts = []
    for key, value in headers.items():
        k, v = key.encode(), value.encode()
        parts += (pack(">H", len(k)), k, pack(">H", len(v)), v)
    header_bytes = b"".join(parts)
    return b"".join((
        _PREFIX,
        pack(">II", _HEADERS_START, _HEADERS_START + 2 + len(header_bytes)),
        pack(">H", len(headers)),
        header_bytes,
        body,
    ))


def parse_frame(raw: bytes) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a frame, checked against contracts/WIRE.md. Raises WireError."""
    n = len(raw)
    if n < _FIXED:
        raise WireError(f"truncated FastStream frame: {n} bytes, its fixed part alone is {_FIXED}")
    (version,) = unpack_from(">H", raw, len(MAGIC))
    if version != FRAME_VERSION:
        raise WireError(f"FastStream frame version {version} is not supported (this reader knows {FRAME_VERSION})")
    headers_start, data_start = unpack_from(">II", raw, len(MAGIC) + 2)
    if headers_start < _FIXED:
        raise WireError(f"bad FastStream frame: headers_start {headers_start} points into the first {_FIXED} bytes")
    if headers_start + 2 > n:
        raise WireError(f"truncated FastStream frame: headers_start {headers_start} is past the end of its {n} bytes")
    (count,) = unpack_from(">H", raw, headers_start)
    pos = headers_start + 2
    headers: dict[str, str] = {}
    for i in range(1, count + 1):
        pair = []
        for part in ("key", "value"):
            if pos + 2 > n:
                raise WireError(f"truncated FastStream frame: header {i} of {count} runs past the end of its {n} bytes")
            (length,) = unpack_from(">H", raw, pos)
            pos += 2
            if pos + length > n:
                raise WireError(f"truncated FastStream frame: header {i} of {count} runs past the end of its {n} bytes")
            try:
                pair.append(raw[pos:pos + length].decode("utf-8"))
            except UnicodeDecodeError:
                raise WireError(f"FastStream frame header {i} {part} is not UTF-8") from None
            pos += length
        headers[pair[0]] = pair[1]
    if data_start > n:
        raise WireError(f"truncated FastStream frame: data_start {data_start} is past the end of its {n} bytes")
    if data_start < pos:
        raise WireError(f"bad FastStream frame: data_start {data_start} points into the headers (they end at {pos})")
    return raw[data_start:], headers


def read_entry(fields: dict[bytes, bytes]) -> tuple[bytes, dict[str, str]]:
    """(envelope bytes, frame headers) of a stream entry. Raises WireError naming the fault.

    `__data__` holds a frame, or (plain clients, entries of old tests) the envelope JSON
    itself; other fields are ignored."""
    raw = fields.get(DATA_FIELD)
    if raw is None:
        raise WireError(_no_data(fields))
    if raw[: len(MAGIC)] == MAGIC:
        return parse_frame(raw)
    if len(raw) < len(MAGIC) and MAGIC.startswith(raw) and raw:
        raise WireError(f"truncated FastStream frame: {len(raw)} bytes, its fixed part alone is {_FIXED}")
    if raw.lstrip(b" \t\r\n")[:1] == b"{":
        return raw, {}
    if not raw:
        raise WireError("__data__ is empty")
    raise WireError(
        f"__data__ is neither a FastStream frame nor a JSON object: it starts with {raw[:8].hex(' ')} "
        f"(a frame starts with {MAGIC.hex(' ')})"
    )


def _no_data(fields: dict[bytes, bytes]) -> str:
    names = list(fields)
    if not names:
        return "the entry has no fields (no __data__)"
    bad = [k for k in names if not _utf8(k)]
    shown = ", ".join(_text(k) for k in names[:8]) + (", ..." if len(names) > 8 else "")
    if bad:
        return f"the entry has no __data__ field and {len(bad)} of its {len(names)} field names are not UTF-8 ({shown})"
    return f"the entry has no __data__ field (fields: {shown})"


def body_of(fields: dict[bytes, bytes]) -> bytes:
    """The envelope bytes of an entry. Raises WireError (a ValueError) for a malformed one."""
    return read_entry(fields)[0]


def dead_letter_fields(fields: dict[bytes, bytes]) -> dict[str, str]:
    """An entry's fields as text for a dead letter, bounded.

    `__data__` is stored as its body when the frame parses (what `helox dlq replay` frames
    again), else as the raw bytes; undecodable bytes are escaped (\\xNN). At most
    DLQ_FIELD_BUDGET bytes of values and DLQ_MAX_FIELDS fields are kept; when anything was cut,
    DLQ_TRUNCATED_KEY records each affected field's original size and SHA-256."""
    out: dict[str, str] = {}
    cut: dict[str, dict[str, int | str]] = {}
    budget = DLQ_FIELD_BUDGET
    items = list(fields.items())
    for k, v in items[:DLQ_MAX_FIELDS]:
        key = _text(k)[:256]
        raw = v if isinstance(v, bytes) else str(v).encode()
        value = raw
        if k == DATA_FIELD:
            try:
                value = read_entry({DATA_FIELD: raw})[0]
            except WireError:
                pass
        head = _text(value[: max(budget, 0)])  # a byte gives at least one byte of text
        kept = _clip(head, budget)
        budget -= sum(map(_json_cost, kept))
        out[key] = kept
        if len(value) > len(kept.encode()) or kept != head:
            cut[key] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    dropped = len(items) - DLQ_MAX_FIELDS
    if cut or dropped > 0:
        record: dict[str, object] = dict(cut)
        if dropped > 0:
            record["dropped_fields"] = dropped
        out[DLQ_TRUNCATED_KEY] = json.dumps(record, sort_keys=True)
    return out


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _text(b: bytes | str) -> str:
    return b.decode("utf-8", "backslashreplace") if isinstance(b, bytes) else str(b)


def _json_cost(ch: str) -> int:
    """Bytes `ch` takes inside a JSON string (UTF-8, escapes as pydantic writes them)."""
    if ch in '"\\\b\f\n\r\t':
        return 2
    if ch < " ":
        return 6
    return len(ch.encode("utf-8", "surrogatepass"))


def _clip(text: str, budget: int) -> str:
    """The longest prefix of `text` that takes at most `budget` bytes as JSON string content."""
    used = 0
    for i, ch in enumerate(text):
        used += _json_cost(ch)
        if used > budget:
            return text[:i]
    return text
