"""Looking up a run's request: its configuration travels once, in RunRequested, and the
services downstream (trainer, evaluator, exporter) read their section from it."""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

from contracts import Envelope, RunRequested, topic_for
from contracts.codec import decode
from shared.bus import Bus
from shared.bus.wire import body_of

SCAN_BATCH = 500

_CACHE: WeakKeyDictionary[Bus, dict[str, Envelope[RunRequested]]] = WeakKeyDictionary()
"""Run requests already found, per bus (a run's request never changes)."""


class RunNotFoundError(LookupError):
    """No RunRequested with this run id in the stream (trimmed, or never requested)."""


async def find_run_request(bus: Bus, run_id: str, *, max_scan: int = 100_000) -> Envelope[RunRequested]:
    """The newest RunRequested of `run_id`, scanning runs.requested backwards."""
    cache = _CACHE.setdefault(bus, {})
    if run_id in cache:
        return cache[run_id]
    stream = topic_for(RunRequested).stream(bus.prefix)
    end: Any = "+"
    scanned = 0
    while scanned < max_scan:
        rows = await bus.redis.xrevrange(stream, max=end, count=SCAN_BATCH)
        if not rows:
            break
        for _entry_id, fields in rows:
            try:
                env = decode(body_of(fields), RunRequested)
            except ValueError:
                continue
            if env.run_id == run_id:
                cache[run_id] = env
                return env
        scanned += len(rows)
        last = rows[-1][0].decode() if isinstance(rows[-1][0], bytes) else rows[-1][0]
        end = f"({last}"
    raise RunNotFoundError(f"no RunRequested for run {run_id!r} in {stream}")


def section(env: Envelope[RunRequested], name: str) -> dict[str, Any]:
    """One section of the run config (empty when absent)."""
    value = env.payload.config.get(name) or {}
    if not isinstance(value, dict):
        raise ValueError(f"run {env.run_id}: config section {name!r} must be a mapping")
    return value
