"""The outbox against a real redis-server that goes away and comes back."""

from __future__ import annotations

import time
from pathlib import Path

import redis

from contracts import DataPrepProgress, Producer, TrainingMetrics
from shared.bus import Outbox
from shared.redis_server import RedisServer

from .helpers import read_all, wait_for

PRODUCER = Producer(service="trainer", instance="trainer-test")


def _event(i: int) -> DataPrepProgress:
    return DataPrepProgress(stage="outbox-test", fraction=0.0, detail=str(i))


def test_outbox_survives_redis_outage_in_order_without_duplicates(redis_server: RedisServer, tmp_path: Path) -> None:
    outbox = Outbox(redis_server.url, producer=PRODUCER, spill_dir=tmp_path / "spill")
    try:
        for i in range(300):
            outbox.publish(_event(i), run_id="r1")
        assert outbox.flush(10)

        redis_server.stop()
        worst = 0.0
        for i in range(300, 700):
            t0 = time.perf_counter()
            outbox.publish(_event(i), run_id="r1")
            worst = max(worst, time.perf_counter() - t0)
        # publish never waits on Redis, even while it is down.
        assert worst < 0.05
        wait_for(lambda: outbox.spilled >= 400, timeout=10, what="events to spill to disk")
        assert outbox.spill_path.stat().st_size > 0
        time.sleep(3)  # down for several seconds

        redis_server.start()  # same port, same data dir
        for i in range(700, 1000):
            outbox.publish(_event(i), run_id="r1")
        assert outbox.flush(30), "outbox did not drain after Redis came back"
        assert outbox.spill_path.stat().st_size == 0  # truncated after replay

        client = redis.Redis.from_url(redis_server.url)
        got = [int(e.payload.detail) for e in read_all(client, DataPrepProgress)]
        assert got == list(range(1000))  # all, in order, once
    finally:
        outbox.close()


def test_leftover_spill_file_is_replayed_by_the_next_outbox(redis_server: RedisServer, tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    redis_server.stop()
    first = Outbox(redis_server.url, producer=PRODUCER, spill_dir=spill)
    for i in range(50):
        first.publish(_event(i))
    assert not first.close(timeout=1.0)  # Redis down: events stay on disk
    assert first.spill_path.exists() and first.spill_path.stat().st_size > 0

    redis_server.start()
    second = Outbox(redis_server.url, producer=PRODUCER, spill_dir=spill)
    try:
        second.publish(_event(50))
        assert second.flush(20)
        client = redis.Redis.from_url(redis_server.url)
        got = [int(e.payload.detail) for e in read_all(client, DataPrepProgress)]
        assert got == list(range(51))
        assert not first.spill_path.exists()
    finally:
        second.close()


def test_outbox_carries_non_finite_metrics(redis_server: RedisServer, tmp_path: Path) -> None:
    outbox = Outbox(redis_server.url, producer=PRODUCER, spill_dir=tmp_path / "spill")
    try:
        metric = TrainingMetrics(step=1, tokens_seen=1, loss=float("nan"), lr=0.1, grad_norm=float("inf"), seq_len=8, batch_size=1)
        outbox.publish(metric)
        assert outbox.flush(10)
        client = redis.Redis.from_url(redis_server.url)
        (env,) = read_all(client, TrainingMetrics)
        assert env.payload.loss != env.payload.loss  # NaN survives the wire
        assert env.payload.grad_norm == float("inf")
    finally:
        outbox.close()
