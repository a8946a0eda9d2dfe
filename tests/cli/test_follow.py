"""`helox events tail` (the follow loop `helox run` uses too) against a real Redis that restarts."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis

from shared.redis_server import RedisServer
from tests.bus.helpers import publish, run_request

REPO = Path(__file__).resolve().parents[2]


class Tail:
    """`helox events tail ARGS` as a real process, its stdout lines collected as they come."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "helox.cli", "events", "tail", *args], env=env, cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def next_line(self, timeout: float) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"no line from `helox events tail` within {timeout}s; stderr:\n{err}") from None

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err


def test_events_tail_keeps_going_through_a_redis_restart_and_misses_nothing(
    redis_server: RedisServer, subprocess_env: dict[str, str]
) -> None:
    client = redis.Redis.from_url(redis_server.url)
    publish(client, run_request("before"))
    tail = Tail(["--json", "--from-start", "--topic", "runs.requested", "--count", "3", "--timeout", "90"],
                subprocess_env)
    try:
        assert json.loads(tail.next_line(60))["run_id"] == "before"
        redis_server.restart(down_for=3.0)  # same port, same data (AOF)
        client = redis.Redis.from_url(redis_server.url)
        # Written at once, likely while the tail is still backing off: read from the last id seen, not "now".
        publish(client, run_request("after-1"))
        publish(client, run_request("after-2"))
        got = [json.loads(tail.next_line(60))["run_id"] for _ in range(2)]
        code, err = tail.finish()
    finally:
        if tail.proc.poll() is None:
            tail.proc.kill()
    assert got == ["after-1", "after-2"]
    assert code == 0, err
    assert "lost Redis" in err and "reconnected to Redis" in err
    assert "Traceback" not in err


def test_events_tail_json_prints_only_json_lines_on_stdout(redis_url: str, subprocess_env: dict[str, str]) -> None:
    client = redis.Redis.from_url(redis_url)
    client.xadd("helox.runs.requested", {"x": "not an event"})
    publish(client, run_request("valid"))
    proc = subprocess.run(
        [sys.executable, "-m", "helox.cli", "events", "tail", "--json", "--from-start", "--topic", "runs.requested",
         "--count", "1", "--timeout", "30"],
        env=subprocess_env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [json.loads(line)["run_id"] for line in lines] == ["valid"]
    assert "not a valid Helox event" in proc.stderr


def test_the_follow_loop_says_when_redis_is_lost_and_back_and_keeps_ticking(tmp_path: Path) -> None:
    """In-process: while Redis is away the loop yields idle ticks (callers check their clocks)."""
    from helox.events import follow

    server = RedisServer(tmp_path / "redis").start()
    notices: list[str] = []
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        events = follow(client, ["helox.runs.requested"], start="$", block_ms=100, notice=notices.append,
                        sleep=lambda _s: time.sleep(0.05))
        assert next(events)[0] == ""  # pinned, idle
        server.stop()
        ticks = [next(events) for _ in range(5)]
        assert all(t[0] == "" for t in ticks) and notices and notices[0].startswith("lost Redis")
        assert len(notices) == 1  # said once, not once per attempt
        server.start()
        publish(redis.Redis.from_url(server.url), run_request("back"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stream, _id, env, _f = next(events)
            if stream:
                break
        assert env is not None and env.run_id == "back"
        assert notices[-1].startswith("reconnected to Redis")
    finally:
        server.stop()
