"""Fixtures shared by the whole suite: real redis-server processes the tests start themselves."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.config import HeloxSettings
from shared.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a random loopback port with its own data dir (AOF on)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> HeloxSettings:
    """Settings pointing at the test's Redis, with short timeouts so tests stay fast."""
    return HeloxSettings(
        redis_url=redis_url,
        artifacts=tmp_path / "artifacts",
        state_dir=tmp_path / "state",
        reclaim_idle_ms=1000,
        polling_interval_ms=50,
        max_deliveries=3,
        heartbeat_interval_s=0.5,
    )


@pytest.fixture
def subprocess_env(settings: HeloxSettings) -> dict[str, str]:
    """Environment for service processes started by a test."""
    env = dict(os.environ)
    env.update(
        HELOX_REDIS_URL=settings.redis_url or "",
        HELOX_ARTIFACTS=str(settings.artifacts),
        HELOX_STATE_DIR=str(settings.state_dir),
        HELOX_RECLAIM_IDLE_MS=str(settings.reclaim_idle_ms),
        HELOX_POLLING_INTERVAL_MS=str(settings.polling_interval_ms),
        HELOX_MAX_DELIVERIES=str(settings.max_deliveries),
        HELOX_HEARTBEAT_INTERVAL_S=str(settings.heartbeat_interval_s),
        HELOX_LOG_FORMAT="json",
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
    )
    env.pop("HELOX_CONFIG", None)
    return env


PYTHON = sys.executable
