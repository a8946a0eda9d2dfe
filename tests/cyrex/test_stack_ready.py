"""`--with-cyrex`: the local stack is up (and `helox run` submits) only once the supervised Cyrex
heart-beats `ready`; a Cyrex that exits or stays indexing past the bound is one line of error
naming Cyrex, and nothing is left running. Real processes: the stack's services, the reference
Cyrex, a real Redis; `helox up` as a user runs it."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from contracts import Producer, RetrieverHeartbeat, topic_for
from contracts.codec import decode, envelope
from helox.errors import CliError
from helox.stack import CYREX_READY_ENV, CyrexNotReadyError, LocalStack, cyrex_ready_timeout
from shared.bus.wire import encode_entry, read_entry

REPO = Path(__file__).resolve().parents[2]
HEARTBEATS = topic_for(RetrieverHeartbeat).stream("helox.")


def collection(root: Path, files: int) -> Path:
    """Text of its own words: ~14 KB a file (~0.5 s of indexing per 100 files on an idle core)."""
    rng = random.Random(1)
    words = [f"w{i}" for i in range(5000)]
    root.mkdir(parents=True)
    for n in range(files):
        (root / f"doc{n:04d}.txt").write_text(
            "\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(40)))
    return root


def beats(client: redis.Redis, instance: str = "cyrex-1") -> list[RetrieverHeartbeat]:
    out = [decode(read_entry(f)[0], RetrieverHeartbeat).payload for _, f in client.xrange(HEARTBEATS)]
    return [h for h in out if h.instance == instance]


def test_start_returns_once_cyrex_is_ready_not_when_it_first_announces_itself(settings, tmp_path: Path) -> None:
    client = redis.Redis.from_url(settings.redis_url)
    # A `ready` left on the stream by an earlier Cyrex of the same name must not count.
    stale = RetrieverHeartbeat(name="cyrex", instance="cyrex-1", version="old", index_digest="0" * 64,
                               index_chunks=1, index_documents=1, max_k=4, status="ready", interval_s=600)
    client.xadd(HEARTBEATS, encode_entry(envelope(stale, producer=Producer(service="cyrex", instance="cyrex-1"))))
    lines: list[str] = []
    stack = LocalStack(settings, services=["health-monitor"], cyrex_collection=collection(tmp_path / "docs", 300),
                       say=lines.append)
    stack.start()
    try:
        mine = beats(client)[1:]
        assert [h.status for h in mine][:1] == ["indexing"]  # it announced itself before it was ready...
        assert stack.cyrex_ready is not None and stack.cyrex_ready.status == "ready"  # ...and start waited
        assert stack.cyrex_ready.index_chunks > 0 and stack.cyrex_ready.version != "old"
        assert stack.cyrex_ready == next(h for h in mine if h.status == "ready")
        assert stack.state_file.exists()
        assert lines[0].startswith("waiting for Cyrex (cyrex-1) to index") and lines[-1].startswith(
            "Cyrex (cyrex-1) ready: ")
    finally:
        stack.stop()


def test_a_cyrex_that_dies_while_indexing_fails_the_start_naming_it(settings, tmp_path: Path) -> None:
    stack: LocalStack

    def kill_cyrex(line: str) -> None:  # the moment start() begins to wait: Cyrex is indexing
        if line.startswith("waiting"):
            stack.cyrex_slot.proc.kill()

    stack = LocalStack(settings, services=["health-monitor"], cyrex_collection=collection(tmp_path / "docs", 200),
                       say=kill_cyrex)
    with pytest.raises(CyrexNotReadyError, match=r"^Cyrex \(cyrex-1\) exited with code -9 before it was ready"):
        stack.start()
    assert all(slot.proc is None for slot in stack.slots)  # the whole stack was stopped
    assert not stack.state_file.exists()


def test_helox_up_with_a_cyrex_never_ready_in_time_is_one_line_naming_cyrex(settings, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELOX_")}
    env.update(HELOX_REDIS_URL=settings.redis_url, HELOX_STATE_DIR=str(tmp_path / "state"),
               HELOX_ARTIFACTS=str(tmp_path / "artifacts"), HELOX_SIGNING_KEY="k", PYTHONPATH=str(REPO),
               COLUMNS="300")
    docs = collection(tmp_path / "docs", 1200)  # seconds of indexing: never within 1 s
    proc = subprocess.run([sys.executable, "-m", "helox.cli", "up", "--services", "health-monitor", "--with-cyrex",
                           "--cyrex-collection", str(docs), "--cyrex-ready-timeout", "1"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: Cyrex (cyrex-1) was not ready within 1 s"), proc.stderr
    assert CYREX_READY_ENV in errors[0] and "stack up" not in proc.stdout
    assert not (tmp_path / "state" / "stack.json").exists()
    statuses = [h.status for h in beats(redis.Redis.from_url(settings.redis_url))]
    assert "ready" not in statuses  # stopped before it served
    # Killed while indexing, or (a loaded machine: its imports alone can take a second) before its
    # first heartbeat; the line says which.
    if statuses:
        assert "indexing" in statuses and set(statuses) <= {"indexing", "stopping"}, statuses
        assert "(last heartbeat: indexing;" in errors[0], errors
    else:
        assert "(no heartbeat from it;" in errors[0], errors


def test_the_ready_timeout_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CYREX_READY_ENV, "soon")
    with pytest.raises(CliError, match=CYREX_READY_ENV):
        cyrex_ready_timeout()
    monkeypatch.setenv(CYREX_READY_ENV, "45")
    assert cyrex_ready_timeout() == 45.0
    with pytest.raises(CliError, match="between 0 and 86400"):
        cyrex_ready_timeout(-1)
