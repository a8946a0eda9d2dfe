"""Helpers for bus tests: start worker processes, publish, wait."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from contracts import Envelope, Event, Producer, RunRequested, topic_for
from contracts.codec import envelope
from shared.bus.admin import decode_entry
from shared.bus.wire import encode_entry

WORKER = Path(__file__).with_name("worker.py")
PRODUCER = Producer(service="test", instance="pytest")


def start_worker(env: dict[str, str], instance: str, log_dir: Path) -> subprocess.Popen[bytes]:
    log = open(log_dir / f"{instance}.log", "ab")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, str(WORKER)], env={**env, "HELOX_INSTANCE": instance}, stdout=log, stderr=subprocess.STDOUT
    )


def run_request(name: str, **config: Any) -> Envelope[RunRequested]:
    return envelope(RunRequested(name=name, config=config, config_hash="0" * 64), producer=PRODUCER, run_id=name)


def publish(client: redis.Redis, env: Envelope[Any], prefix: str = "helox.") -> str:
    stream = topic_for(env.payload).stream(prefix)
    return client.xadd(stream, encode_entry(env)).decode()


def read_all(client: redis.Redis, payload: type[Event], prefix: str = "helox.") -> list[Envelope[Any]]:
    out = []
    for _id, fields in client.xrange(topic_for(payload).stream(prefix)):
        env = decode_entry(fields)
        if env is not None:
            out.append(env)
    return out


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_for_group(client: redis.Redis, stream: str, group: str, timeout: float = 20.0) -> None:
    def ready() -> bool:
        try:
            return any(g["name"].decode() == group for g in client.xinfo_groups(stream))
        except redis.ResponseError:
            return False

    wait_for(ready, timeout, f"group {group} on {stream}")


def wait_for_heartbeat(client: redis.Redis, instance: str, timeout: float = 20.0) -> None:
    from shared.bus.admin import live_instances

    wait_for(
        lambda: any(i.instance == instance and i.alive for i in live_instances(client, "helox.")),
        timeout,
        f"a heartbeat from {instance}",
    )


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
