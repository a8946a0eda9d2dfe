"""The helox CLI and the local stack, against a real Redis and real service processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from contracts import DeadLetter, RunRequested, ServiceHeartbeat
from shared.bus.admin import live_instances
from tests.bus.helpers import publish, read_all, run_request, wait_for

HELOX = [sys.executable, "-m", "helox.cli"]
REPO = Path(__file__).resolve().parents[2]


def helox(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HELOX, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_status_shows_instances_streams_and_dead_letters(redis_url: str, subprocess_env: dict[str, str]) -> None:
    client = redis.Redis.from_url(redis_url)
    proc = subprocess.Popen([sys.executable, "-m", "services.exporter"], env={**subprocess_env, "HELOX_INSTANCE": "exporter-7"})
    try:
        wait_for(lambda: any(i.instance == "exporter-7" and i.alive for i in live_instances(client, "helox.")))
        client.xadd("helox.dlq", {"x": "y"})
        out = helox(["status", "--json"], subprocess_env)
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        inst = next(i for i in data["instances"] if i["instance"] == "exporter-7")
        assert inst["service"] == "exporter" and inst["alive"]
        assert data["dead_letters"] == 1
        assert any(s["topic"] == "services.heartbeat" and s["length"] >= 1 for s in data["streams"])
        human = helox(["status"], subprocess_env)
        assert "exporter-7" in human.stdout and "dead letters: 1" in human.stdout
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


def test_events_tail_filters_by_topic_and_run(redis_url: str, subprocess_env: dict[str, str]) -> None:
    client = redis.Redis.from_url(redis_url)
    publish(client, run_request("run-a"))
    publish(client, run_request("run-b"))
    out = helox(["events", "tail", "--from-start", "--topic", "runs.requested", "--run", "run-b", "--json",
                 "--count", "1", "--timeout", "20"], subprocess_env)
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.strip().splitlines()
    env = json.loads(line)
    assert env["run_id"] == "run-b" and env["type"] == "RunRequested"
    bad = helox(["events", "tail", "--topic", "nope"], subprocess_env)
    assert bad.returncode == 2 and "unknown topic" in bad.stderr


def test_dlq_list_and_replay(redis_url: str, subprocess_env: dict[str, str], tmp_path: Path) -> None:
    from tests.bus.helpers import start_worker, stop, wait_for_group

    client = redis.Redis.from_url(redis_url)
    worker = start_worker(subprocess_env, "worker-a", tmp_path)
    try:
        wait_for_group(client, "helox.runs.requested", "worker")
        failing = run_request("flaky", fail=True)
        publish(client, failing)
        wait_for(lambda: read_all(client, DeadLetter), timeout=30, what="the dead letter")
        listed = helox(["dlq", "list", "--json"], subprocess_env)
        (row,) = [json.loads(x) for x in listed.stdout.splitlines()]
        assert row["error_type"] == "RuntimeError" and row["original_stream"] == "helox.runs.requested"
        replayed = helox(["dlq", "replay", row["id"]], subprocess_env)
        assert replayed.returncode == 0, replayed.stderr
        assert client.xlen("helox.dlq") in (0, 1)  # removed; fails again -> dead-lettered again
        originals = [e for e in read_all(client, RunRequested) if e.event_id == failing.event_id]
        assert len(originals) == 2  # the original and its replay, same event id
        wait_for(lambda: client.xlen("helox.dlq") == 1, timeout=30, what="the replayed event to fail again")
    finally:
        stop(worker)


def test_up_starts_services_restarts_a_crashed_one_and_stops_all(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELOX_")}
    env.update(HELOX_STATE_DIR=str(tmp_path / "state"), HELOX_ARTIFACTS=str(tmp_path / "art"),
               HELOX_HEARTBEAT_INTERVAL_S="0.5", PYTHONPATH=str(REPO))
    up = subprocess.Popen([*HELOX, "up", "--evaluators", "2"], env=env, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = tmp_path / "state" / "stack.json"
    try:
        wait_for(state.exists, timeout=30, what="the stack state file")
        url = json.loads(state.read_text())["redis_url"]  # embedded Redis: no HELOX_REDIS_URL given
        client = redis.Redis.from_url(url)
        names = {"data-prep-1", "trainer-1", "health-monitor-1", "evaluator-1", "evaluator-2", "exporter-1"}
        wait_for(lambda: names <= {i.instance for i in live_instances(client, "helox.") if i.alive}, timeout=60,
                 what="every service instance to heartbeat")
        # `helox status` finds the running stack by itself.
        status = helox(["status", "--json"], env)
        assert status.returncode == 0 and "evaluator-2" in status.stdout
        victim = next(i for i in live_instances(client, "helox.") if i.instance == "trainer-1")
        os.kill(victim.pid, signal.SIGKILL)
        wait_for(lambda: any(i.instance == "trainer-1" and i.alive and i.pid != victim.pid
                             for i in live_instances(client, "helox.")), timeout=30, what="trainer-1 restarted")
    finally:
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=60)
    assert up.returncode == 0, out
    assert "restarted" in out and "stack stopped" in out
    assert not state.exists()
    beats = [e.payload for e in read_all_safe(url, ServiceHeartbeat)]
    assert beats == []  # embedded Redis is gone with the stack


def read_all_safe(url: str, payload: type) -> list:
    try:
        return read_all(redis.Redis.from_url(url, socket_connect_timeout=1), payload)
    except redis.ConnectionError:
        return []


def test_run_fails_fast_when_a_stage_has_no_consumer(redis_url: str, subprocess_env: dict[str, str], tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("name: nobody\nstages: [data]\ntimeout_s: 60\n")
    t0 = time.monotonic()
    out = helox(["run", str(cfg)], {**subprocess_env, "HELOX_STARTUP_WAIT_S": "1"}, timeout=120)
    assert out.returncode == 1
    assert "nothing handles these stages" in out.stderr and "data-prep" in out.stderr
    assert time.monotonic() - t0 < 90


def test_report_and_watch_read_a_stopped_local_stack_from_its_data(tmp_path: Path) -> None:
    """After `helox run` stopped the stack it started, its runs can still be reported and watched back."""
    from contracts import TrainingMetrics
    from contracts.codec import envelope
    from shared.redis_server import RedisServer
    from tests.bus.helpers import PRODUCER

    state = tmp_path / "state"
    server = RedisServer(state / "redis").start()
    try:
        client = redis.Redis.from_url(server.url)
        for step in (10, 20, 30):
            m = TrainingMetrics(step=step, tokens_seen=step * 100, loss=5.0 - step / 10, lr=1e-3, grad_norm=1.0,
                                tokens_per_s=1000.0, seq_len=64, batch_size=8, data_cursor=step)
            publish(client, envelope(m, producer=PRODUCER, run_id="run-x"))
    finally:
        server.stop()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELOX_")}
    env.update(HELOX_STATE_DIR=str(state), HELOX_ARTIFACTS=str(tmp_path / "art"), PYTHONPATH=str(REPO))
    for attempt in range(2):  # twice: the first command's embedded server must have stopped cleanly
        page = tmp_path / f"report-{attempt}.html"
        out = helox(["report", "run-x", "--out", str(page)], env)
        assert out.returncode == 0, out.stderr
        html = page.read_text()
        assert "<svg" in html and "run-x" in html
    watched = helox(["watch", "run-x", "--once"], env)
    assert watched.returncode == 0 and "run-x" in watched.stdout, watched.stderr
    none = helox(["report", "run-x"], {**env, "HELOX_STATE_DIR": str(tmp_path / "empty")})
    assert none.returncode == 2 and "no Redis" in none.stderr
