"""`helox status` flags pending entries delivered more than max_deliveries times (XPENDING per group)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from shared.bus.admin import stream_states
from tests.bus.helpers import publish, run_request

REPO = Path(__file__).resolve().parents[2]
STREAM = "helox.runs.requested"


def deliver(client: redis.Redis, entry_id: str, times: int, consumer: str = "data-prep-1") -> None:
    """Make ENTRY_ID pending in group data-prep, delivered TIMES times (XCLAIM's RETRYCOUNT sets the count)."""
    client.xclaim(STREAM, "data-prep", consumer, min_idle_time=0, message_ids=[entry_id], retrycount=times)


@pytest.fixture
def stuck(redis_url: str) -> tuple[redis.Redis, list[str]]:
    """Five entries read by group data-prep: the 2nd and 4th delivered 9 times, the rest once."""
    client = redis.Redis.from_url(redis_url)
    ids = [publish(client, run_request(f"run-{i}")) for i in range(5)]
    client.xgroup_create(STREAM, "data-prep", id="0")
    client.xreadgroup("data-prep", "data-prep-1", {STREAM: ">"}, count=10)
    for entry_id in (ids[1], ids[3]):
        deliver(client, entry_id, 9)
    return client, ids


def test_status_flags_entries_delivered_more_than_max_deliveries(stuck, subprocess_env: dict[str, str]) -> None:
    _client, ids = stuck
    env = {**subprocess_env, "HELOX_MAX_DELIVERIES": "3", "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "helox.cli", "status", "--json"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["max_deliveries"] == 3
    flagged = {(e["entry_id"], e["group"], e["deliveries"], e["topic"]) for e in data["over_delivered"]}
    assert flagged == {(ids[1], "data-prep", 9, "runs.requested"), (ids[3], "data-prep", 9, "runs.requested")}
    human = subprocess.run([sys.executable, "-m", "helox.cli", "status"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert human.returncode == 0, human.stderr
    assert "over-delivered entries: 2" in human.stdout and ids[1] in human.stdout and ids[3] in human.stdout
    relaxed = subprocess.run([sys.executable, "-m", "helox.cli", "status", "--json"],
                             env={**env, "HELOX_MAX_DELIVERIES": "9"}, cwd=REPO, capture_output=True, text=True,
                             timeout=60)
    assert json.loads(relaxed.stdout)["over_delivered"] == []  # 9 deliveries are within a limit of 9


def test_over_delivered_reads_every_page_of_xpending(stuck, monkeypatch) -> None:
    import helox.pending

    client, ids = stuck
    deliver(client, ids[4], 4)
    monkeypatch.setattr(helox.pending, "PAGE", 2)
    found = helox.pending.over_delivered(client, stream_states(client, "helox."), max_deliveries=3)
    assert [(e.entry_id, e.deliveries, e.consumer) for e in found] == [
        (ids[1], 9, "data-prep-1"), (ids[3], 9, "data-prep-1"), (ids[4], 4, "data-prep-1")]
