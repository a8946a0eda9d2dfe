"""Delivery semantics against a real redis-server and real worker processes."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import redis

from contracts import DataPrepProgress, DeadLetter, RunRequested
from shared.bus.wire import frame
from shared.redis_server import RedisServer

from .helpers import (
    publish,
    read_all,
    run_request,
    start_worker,
    stop,
    wait_for,
    wait_for_group,
    wait_for_heartbeat,
)

STREAM = "helox.runs.requested"


def _effects(client: redis.Redis) -> list[str]:
    return [x.decode() for x in client.lrange("effects", 0, -1)]


def test_two_processes_exchange_typed_events(redis_url: str, subprocess_env: dict[str, str], tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url)
    worker = start_worker(subprocess_env, "worker-a", tmp_path)
    try:
        wait_for_group(client, STREAM, "worker")
        sent = run_request("hello")
        publish(client, sent)
        replies = wait_for(lambda: read_all(client, DataPrepProgress), what="a reply event")
        reply = replies[0]
        assert isinstance(reply.payload, DataPrepProgress)
        assert reply.payload.detail == "hello"
        # The runtime filled the envelope from the event being handled.
        assert reply.causation_id == sent.event_id
        assert reply.correlation_id == sent.correlation_id
        assert reply.run_id == "hello"
        assert reply.producer.service == "worker" and reply.producer.instance == "worker-a"
        wait_for(lambda: client.xpending(STREAM, "worker")["pending"] == 0, what="the entry acked")
    finally:
        assert stop(worker) == 0


def test_killed_consumer_entry_completed_by_another_exactly_once(
    redis_url: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    a = start_worker(subprocess_env, "worker-a", tmp_path)
    wait_for_group(client, STREAM, "worker")
    events = [run_request(f"job{i}", sleep=3 if i == 0 else 0.05) for i in range(5)]
    for env in events:
        publish(client, env)
    first = str(events[0].event_id)
    wait_for(lambda: client.llen(f"started:{first}"), what="worker-a to start the first job")
    a.send_signal(signal.SIGKILL)
    a.wait()
    assert _effects(client) == []  # killed mid-handler: no effect yet, entry pending
    b = start_worker(subprocess_env, "worker-b", tmp_path)
    try:
        wait_for(lambda: len(_effects(client)) == 5, timeout=30, what="worker-b to finish every job")
        time.sleep(1.5)  # a reclaim interval: nothing may run twice
        effects = _effects(client)
        assert sorted(effects) == sorted(str(e.event_id) for e in events)
        assert len(set(effects)) == 5
        starters = [x.decode() for x in client.lrange(f"started:{first}", 0, -1)]
        assert starters[0] == "worker-a" and "worker-b" in starters
        wait_for(lambda: client.xpending(STREAM, "worker")["pending"] == 0, what="every entry acked")
    finally:
        assert stop(b) == 0


def test_bad_messages_go_to_dlq_and_consumer_carries_on(
    redis_url: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    worker = start_worker(subprocess_env, "worker-a", tmp_path)
    try:
        wait_for_group(client, STREAM, "worker")
        client.xadd(STREAM, {"__data__": b"{this is not json"})
        wrong = json.loads(run_request("wrong").model_dump_json())
        del wrong["payload"]["config"]  # required field missing: wrong schema
        client.xadd(STREAM, {"__data__": json.dumps(wrong).encode()})
        future = json.loads(run_request("future").model_dump_json())
        future["schema_version"] = "2.0"
        client.xadd(STREAM, {"__data__": json.dumps(future).encode()})
        client.xadd(STREAM, {"junk": b"\xff\xfe not even ours"})
        # JSON-typed frames whose body is not JSON / not UTF-8: these failed in FastStream's
        # decoder (before the ack) and stayed pending for ever.
        client.xadd(STREAM, {"__data__": frame(b"{this is not json", {"content-type": "application/json"})})
        client.xadd(STREAM, {"__data__": frame(b"\xff\xfe\x00", {"content-type": "application/json"})})
        failing = run_request("failing", fail=True)
        publish(client, failing)
        good = run_request("good")
        publish(client, good)

        letters = wait_for(lambda: len(read_all(client, DeadLetter)) >= 7 and read_all(client, DeadLetter), timeout=30, what="7 dead letters")
        kinds = sorted(e.payload.error_type for e in letters)
        assert kinds == sorted(["decode", "schema", "version", "decode", "decode", "decode", "RuntimeError"])
        reasons = sorted(e.payload.error for e in letters if e.payload.error_type == "decode")
        assert [r.split(" (")[0] for r in reasons] == [
            "the body is not JSON", "the body is not JSON", "the body is not UTF-8", "the entry has no __data__ field"]
        failed = next(e.payload for e in letters if e.payload.error_type == "RuntimeError")
        assert failed.delivery_count == int(subprocess_env["HELOX_MAX_DELIVERIES"])
        assert failed.group == "worker" and failed.original_stream == STREAM
        assert "planned failure" in failed.error
        version = next(e.payload for e in letters if e.payload.error_type == "version")
        assert "major 2" in version.error and version.delivery_count == 1
        assert str(good.event_id) in _effects(client)
        wait_for(lambda: client.xpending(STREAM, "worker")["pending"] == 0, what="every entry acked")
        time.sleep(1.5)  # a reclaim interval: nothing is dead-lettered twice
        assert len(read_all(client, DeadLetter)) == 7
    finally:
        assert stop(worker) == 0
    log = (tmp_path / "worker-a.log").read_text()
    # No entry failed inside FastStream (parser or decoder): only the planned failure's traceback.
    assert "JSONDecodeError" not in log and "UnicodeDecodeError" not in log
    assert log.count("Traceback") == int(subprocess_env["HELOX_MAX_DELIVERIES"]) - 1


def test_redis_restart_keeps_data_and_empty_restart_recovers(
    redis_server: RedisServer, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_server.url)
    worker = start_worker(subprocess_env, "worker-a", tmp_path)
    try:
        wait_for_group(client, STREAM, "worker")
        before = run_request("before")
        publish(client, before)
        wait_for(lambda: str(before.event_id) in _effects(client), what="first event handled")

        # Restart with the data dir: stream, group and markers survive; the worker reconnects.
        redis_server.restart(down_for=1.0)
        client = redis.Redis.from_url(redis_server.url)
        assert str(before.event_id) in _effects(client)
        assert client.xlen(STREAM) == 1
        after = run_request("after-restart")
        publish(client, after)
        wait_for(lambda: str(after.event_id) in _effects(client), timeout=30, what="event after restart")

        # Restart empty: NOGROUP on the next read; the worker recreates its group.
        redis_server.restart(wipe=True)
        client = redis.Redis.from_url(redis_server.url)
        assert client.xlen(STREAM) == 0
        empty = run_request("after-wipe")
        publish(client, empty)
        wait_for(lambda: str(empty.event_id) in _effects(client), timeout=30, what="event after empty restart")
        # The effect is committed just before the ack: wait for the ack rather than race it.
        wait_for(lambda: client.xpending(STREAM, "worker")["pending"] == 0, what="the entry acked")
    finally:
        assert stop(worker) == 0
    # While Redis was away FastStream's subscribers failed every read: one line per retry
    # interval, never a traceback per subscriber and attempt.
    log = (tmp_path / "worker-a.log").read_text()
    assert "Traceback" not in log
    outage = [line for line in log.splitlines() if "Redis read failed, retrying" in line]
    assert outage and len(outage) <= 30, outage


def test_sigterm_mid_handler_stops_cleanly_and_loses_nothing(
    redis_url: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    a = start_worker(subprocess_env, "worker-a", tmp_path)
    wait_for_group(client, STREAM, "worker")
    slow = run_request("slow", sleep=1.5)
    publish(client, slow)
    wait_for(lambda: client.llen(f"started:{slow.event_id}"), what="the slow job to start")
    assert stop(a) == 0  # graceful: exit code 0
    # Either finished and acked before exit, or left pending for the next instance: never
    # an effect without its ack, nor an ack without its effect.
    pending = client.xpending(STREAM, "worker")["pending"]
    assert (str(slow.event_id) in _effects(client)) == (pending == 0)
    b = start_worker(subprocess_env, "worker-b", tmp_path)
    try:
        wait_for_heartbeat(client, "worker-b")
        wait_for(lambda: str(slow.event_id) in _effects(client), timeout=30, what="the slow job's effect")
        wait_for(lambda: client.xpending(STREAM, "worker")["pending"] == 0, what="entry acked")
        assert _effects(client).count(str(slow.event_id)) == 1
    finally:
        assert stop(b) == 0


def test_unknown_fields_and_newer_minor_version_are_accepted(
    redis_url: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    worker = start_worker(subprocess_env, "worker-a", tmp_path)
    try:
        wait_for_group(client, STREAM, "worker")
        newer = json.loads(run_request("newer").model_dump_json())
        newer["schema_version"] = "1.9"
        newer["payload"]["priority"] = "high"  # a field this consumer does not know
        newer["trace"] = {"span": 1}
        client.xadd(STREAM, {"__data__": frame(json.dumps(newer).encode(), {})})
        wait_for(lambda: newer["event_id"] in _effects(client), what="the newer-minor event to be handled")
        assert not read_all(client, DeadLetter)
        assert isinstance(read_all(client, RunRequested)[0].payload, RunRequested)
    finally:
        assert stop(worker) == 0
