"""Pending entries delivered more often than the bus allows: a message the dead-lettering
missed, redelivered again and again (XPENDING on every consumer group)."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from shared.bus.admin import StreamState

PAGE = 1000


@dataclass(frozen=True)
class OverDelivered:
    topic: str
    stream: str
    group: str
    entry_id: str
    consumer: str
    deliveries: int
    idle_ms: int


def over_delivered(client: redis.Redis, streams: list[StreamState], max_deliveries: int) -> list[OverDelivered]:
    """Every pending entry of every group delivered more than MAX_DELIVERIES times."""
    out = []
    for state in streams:
        for group in state.groups:
            if not group.pending:
                continue
            low = "-"
            while True:
                rows = client.xpending_range(state.stream, group.name, min=low, max="+", count=PAGE)
                for row in rows:
                    if int(row["times_delivered"]) > max_deliveries:
                        out.append(OverDelivered(
                            state.topic, state.stream, group.name, _s(row["message_id"]), _s(row["consumer"]),
                            int(row["times_delivered"]), int(row["time_since_delivered"]),
                        ))
                if len(rows) < PAGE:
                    break
                low = f"({_s(rows[-1]['message_id'])}"  # exclusive: the page after the last id
    return out


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
