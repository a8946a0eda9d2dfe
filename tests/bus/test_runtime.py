"""Bus runtime behaviour in one process, against a real redis-server."""

from __future__ import annotations

import asyncio

import redis

from contracts import TOPICS, RunFailed, RunRequested, ServiceHeartbeat
from shared.bus import Bus
from shared.config import HeloxSettings


def _beat(i: int) -> ServiceHeartbeat:
    from datetime import UTC, datetime

    return ServiceHeartbeat(service="s", instance=f"i{i}", pid=i, host="h", version="0", status="idle",
                            started_at=datetime.now(UTC))


async def test_telemetry_is_trimmed_and_lifecycle_kept(settings: HeloxSettings) -> None:
    bus = Bus(settings, "tester", instance="t1")
    await bus.connect()
    try:
        limit = TOPICS["services.heartbeat"].retention.maxlen
        assert limit is not None
        n = limit + 3000
        for start in range(0, n, 1000):
            await bus.publish_many([_beat(i) for i in range(start, min(n, start + 1000))])
        for i in range(200):
            await bus.publish(RunFailed(stage="data", reason=str(i)))
        client = redis.Redis.from_url(settings.redis_url)
        # MAXLEN ~ trims whole macro nodes: about `limit` entries remain, never fewer.
        assert limit <= client.xlen("helox.services.heartbeat") < limit + 1000
        assert client.xlen("helox.runs.failed") == 200
    finally:
        await bus.broker.stop()


async def test_topic_prefix_isolates_deployments(settings: HeloxSettings) -> None:
    blue = Bus(settings.model_copy(update={"topic_prefix": "blue."}), "svc", instance="b1")
    green = Bus(settings.model_copy(update={"topic_prefix": "green."}), "svc", instance="g1")
    got: dict[str, list[str]] = {"blue": [], "green": []}

    async def on_blue(env, _d):  # type: ignore[no-untyped-def]
        got["blue"].append(env.payload.name)

    async def on_green(env, _d):  # type: ignore[no-untyped-def]
        got["green"].append(env.payload.name)

    blue.subscribe(RunRequested, on_blue)
    green.subscribe(RunRequested, on_green)
    await blue.start()
    await green.start()
    try:
        await blue.publish(RunRequested(name="b", config={}, config_hash="0"))
        await green.publish(RunRequested(name="g", config={}, config_hash="0"))
        for _ in range(100):
            if got["blue"] and got["green"]:
                break
            await asyncio.sleep(0.05)
        assert got == {"blue": ["b"], "green": ["g"]}
    finally:
        await blue.stop()
        await green.stop()


async def test_long_handler_keeps_its_claim(settings: HeloxSettings) -> None:
    """A handler running for 3x the reclaim timeout is not reclaimed by a second instance."""
    calls: list[str] = []

    def make(name: str) -> Bus:
        bus = Bus(settings, "svc", instance=name)

        async def on(env, _d):  # type: ignore[no-untyped-def]
            calls.append(name)
            await asyncio.sleep(3 * settings.reclaim_idle_ms / 1000)

        bus.subscribe(RunRequested, on)
        return bus

    first, second = make("first"), make("second")
    await first.start()
    try:
        await first.publish(RunRequested(name="long", config={}, config_hash="0"))
        for _ in range(100):
            if calls:
                break
            await asyncio.sleep(0.05)
        await second.start()
        await asyncio.sleep(3.5 * settings.reclaim_idle_ms / 1000)
        assert calls == ["first"]
        client = redis.Redis.from_url(settings.redis_url)
        for _ in range(100):  # the handler's ack follows its end
            if client.xpending("helox.runs.requested", "svc")["pending"] == 0:
                break
            await asyncio.sleep(0.05)
        assert client.xpending("helox.runs.requested", "svc")["pending"] == 0
        assert calls == ["first"]
    finally:
        await second.stop()
        await first.stop()
