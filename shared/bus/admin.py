"""Read-side views of the bus for operators: live instances, stream and group state,
dead letters and their replay. Synchronous redis-py: used by the CLI and tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis

from contracts import TOPICS, DeadLetter, Envelope, ServiceHeartbeat, topic_for
from contracts.codec import decode, decode_header

from .wire import CONTENT_TYPE, DATA_FIELD, DLQ_TRUNCATED_KEY, body_of, frame, headers_for


@dataclass
class GroupState:
    name: str
    consumers: int
    pending: int
    lag: int | None


@dataclass
class StreamState:
    topic: str
    stream: str
    length: int
    retention: str
    groups: list[GroupState] = field(default_factory=list)


@dataclass
class Instance:
    service: str
    instance: str
    host: str
    pid: int
    status: str
    current_work: str | None
    age_s: float
    alive: bool
    version: str


def decode_entry(fields: dict[bytes, bytes]) -> Envelope[Any] | None:
    """Decode an entry, or None if it is not a valid Helox event."""
    try:
        return decode(body_of(fields))
    except ValueError:
        return None


def stream_states(client: redis.Redis, prefix: str) -> list[StreamState]:
    out = []
    for key, topic in TOPICS.items():
        name = topic.stream(prefix)
        length = int(client.xlen(name))
        state = StreamState(key, name, length, topic.retention.kind)
        if length or client.exists(name):
            try:
                groups = client.xinfo_groups(name)
            except redis.ResponseError:
                groups = []
            for g in groups:
                state.groups.append(
                    GroupState(
                        name=_s(g["name"]),
                        consumers=int(g["consumers"]),
                        pending=int(g["pending"]),
                        lag=int(g["lag"]) if g.get("lag") is not None else None,
                    )
                )
        out.append(state)
    return out


def live_instances(client: redis.Redis, prefix: str, scan: int = 2000) -> list[Instance]:
    """Latest heartbeat per instance; alive when younger than 3 heartbeat intervals."""
    stream = topic_for(ServiceHeartbeat).stream(prefix)
    latest: dict[str, tuple[Envelope[Any], ServiceHeartbeat]] = {}
    for _id, fields in client.xrevrange(stream, count=scan):
        env = decode_entry(fields)
        if env is None or not isinstance(env.payload, ServiceHeartbeat):
            continue
        latest.setdefault(env.payload.instance, (env, env.payload))
    now = datetime.now(UTC)
    out = []
    for env, hb in latest.values():
        age = (now - env.occurred_at).total_seconds()
        alive = age <= 3 * hb.interval_s and hb.status != "stopping"
        out.append(Instance(hb.service, hb.instance, hb.host, hb.pid, hb.status, hb.current_work, age, alive, hb.version))
    return sorted(out, key=lambda i: (i.service, i.instance))


def dead_letters(client: redis.Redis, prefix: str, count: int = 100) -> list[tuple[str, DeadLetter, Envelope[Any]]]:
    stream = topic_for(DeadLetter).stream(prefix)
    out = []
    for entry_id, fields in client.xrange(stream, count=count):
        env = decode_entry(fields)
        if env is not None and isinstance(env.payload, DeadLetter):
            out.append((_s(entry_id), env.payload, env))
    return out


def replay_headers(body: bytes) -> dict[str, str]:
    """Frame headers for a replayed body: all the Bus writes when the body's envelope header
    reads, else content-type alone (contracts/WIRE.md, "Headers")."""
    try:
        head = decode_header(body)
    except ValueError:
        return {"content-type": CONTENT_TYPE}
    return headers_for(str(head.event_id), str(head.correlation_id or head.event_id), head.type)


def replay_dead_letter(client: redis.Redis, prefix: str, entry_id: str) -> str:
    """Put a dead letter's original entry back on its stream, then remove it from the DLQ.

    Refuses a dead letter that holds only a bounded prefix of the entry (its original was
    too large to keep whole): replaying it would publish a different, cut message."""
    stream = topic_for(DeadLetter).stream(prefix)
    rows = client.xrange(stream, min=entry_id, max=entry_id)
    if not rows:
        raise KeyError(f"no dead letter {entry_id} in {stream}")
    env = decode_entry(rows[0][1])
    if env is None or not isinstance(env.payload, DeadLetter):
        raise ValueError(f"dead letter {entry_id} is unreadable")
    letter = env.payload
    if DLQ_TRUNCATED_KEY in letter.original_fields:
        raise ValueError(
            f"dead letter {entry_id} keeps only a prefix of the original entry "
            f"({letter.original_fields[DLQ_TRUNCATED_KEY]}): it cannot be replayed"
        )
    fields: dict[bytes, bytes] = {}
    for k, v in letter.original_fields.items():
        if k.encode() == DATA_FIELD:
            body = v.encode()
            fields[DATA_FIELD] = frame(body, replay_headers(body))
        else:
            fields[k.encode()] = v.encode()
    new_id = client.xadd(letter.original_stream, fields)
    client.xdel(stream, entry_id)
    return _s(new_id)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
