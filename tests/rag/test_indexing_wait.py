"""Discovery of a Cyrex that is still indexing, and reused fallback datasets: a real
`python -m cyrex_example serve` process (the reference Cyrex) on a real Redis, data prep's
pipeline asking it.

- A Cyrex that has announced itself (heartbeat status `indexing`) is waited for up to
  `data.rag.indexing_wait_s`, however short `discovery_timeout_s` (which means "no Cyrex at all").
- Past that bound, auto packs with the local index (a fallback naming the setting) and cyrex fails.
- A run that reuses a dataset packed after a fallback says so again (RetrievalFallback), never silently.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError

from contracts import RetrievalFallback, RetrievalRequested, RetrieverHeartbeat, topic_for
from contracts.codec import decode
from services.data_prep.retrieval import choose_retriever
from shared.bus.wire import read_entry
from shared.data.config import RagConfig
from shared.retrieval import RetrieverUnavailableError, SynapseLink
from tests.bus.helpers import wait_for

from .conftest import PREFIX, REPO, prepare, rag_config

HEARTBEATS = topic_for(RetrieverHeartbeat).stream(PREFIX)
INSTANCE = "cyrex-indexing"


def heartbeats(client: redis.Redis) -> list:
    return [decode(read_entry(f)[0], RetrieverHeartbeat) for _, f in client.xrange(HEARTBEATS)]


def fallbacks(client: redis.Redis) -> list:
    return [decode(read_entry(f)[0], RetrievalFallback)
            for _, f in client.xrange(topic_for(RetrievalFallback).stream(PREFIX))]


def big_collection(root: Path, files: int, paragraphs: int = 40) -> Path:
    """Words of its own (w0..w4999): ~14 KB a file, ~0.5 s of indexing per 100 files on an idle core."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    root.mkdir(parents=True)
    for n in range(files):
        (root / f"doc{n:04d}.txt").write_text(
            "\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(paragraphs)))
    return root


class Cyrex:
    """One reference Cyrex (`serve --retrieval-only`) indexing `collection`."""

    def __init__(self, redis_url: str, collection: Path, log: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cyrex_example", "serve", "--collection", str(collection), "--redis-url",
                 redis_url, "--instance", INSTANCE, "--heartbeat-s", "0.3", "--retrieval-only"],
                env=env, stdout=out, stderr=subprocess.STDOUT)
        self.log = log

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def indexing_cyrex(redis_url: str, tmp_path: Path) -> Iterator[Cyrex]:
    """A Cyrex caught while it indexes a collection large enough to take seconds."""
    client = redis.Redis.from_url(redis_url)
    cyrex = Cyrex(redis_url, big_collection(tmp_path / "collection", 600), tmp_path / "cyrex.log")
    try:
        wait_for(lambda: any(h.payload.status == "indexing" for h in heartbeats(client)), 60,
                 "Cyrex's first (indexing) heartbeat")
        yield cyrex
    finally:
        cyrex.stop()


def ready_at(client: redis.Redis) -> datetime | None:
    return next((h.occurred_at for h in heartbeats(client) if h.payload.status == "ready"), None)


def test_a_cyrex_still_indexing_is_waited_for_and_serves_every_window(
    corpus_root: Path, link: SynapseLink, client: redis.Redis, indexing_cyrex: Cyrex
) -> None:
    started = datetime.now(UTC)
    assert ready_at(client) is None, "Cyrex indexed before the test could ask: make the collection larger"
    # discovery_timeout_s 0: a Cyrex that is not there at all is not waited for; one indexing is.
    result = prepare(corpus_root, rag_config(retriever="auto", discovery_timeout_s=0.0, indexing_wait_s=120.0), link)
    rag = result.manifest.rag
    assert rag.retriever == f"cyrex:{INSTANCE}" and rag.fallbacks == [], rag.fallbacks
    assert rag.queries_by_retriever == {f"cyrex:{INSTANCE}": sum(rag.windows.values())}
    ready = ready_at(client)
    assert ready is not None and ready > started  # it really was indexing when discovery began
    assert rag.retriever_index_digest == next(h.payload.index_digest for h in heartbeats(client)
                                              if h.payload.status == "ready")
    assert fallbacks(client) == []


def test_a_cyrex_indexing_past_indexing_wait_s_falls_back_naming_the_setting(
    corpus_root: Path, link: SynapseLink, client: redis.Redis, indexing_cyrex: Cyrex
) -> None:
    with pytest.raises(RetrieverUnavailableError, match=rf"{INSTANCE}.*still indexing.*data\.rag\.indexing_wait_s"):
        choose_retriever(RagConfig(retriever="cyrex", discovery_timeout_s=0.0, indexing_wait_s=0.3), link)
    t0 = time.monotonic()
    result = prepare(corpus_root, rag_config(retriever="auto", discovery_timeout_s=0.0, indexing_wait_s=0.3), link)
    assert ready_at(client) is None or time.monotonic() - t0 > 0.3, "Cyrex was ready before the bound passed"
    rag = result.manifest.rag
    assert rag.retriever == "local-bm25"
    [fallback] = rag.fallbacks
    assert fallback.from_retriever is None  # nothing was served by it: the local index's own version
    assert f"cyrex:{INSTANCE}" in fallback.reason and "data.rag.indexing_wait_s = 0.3 s" in fallback.reason
    [event] = fallbacks(client)
    assert event.payload.reason == fallback.reason and event.payload.queries == sum(rag.windows.values())
    assert client.xlen(topic_for(RetrievalRequested).stream(PREFIX)) == 0


def test_without_any_cyrex_discovery_timeout_s_alone_bounds_the_wait(link: SynapseLink) -> None:
    t0 = time.monotonic()
    choice = choose_retriever(RagConfig(retriever="auto", discovery_timeout_s=0.5, indexing_wait_s=600.0), link)
    assert time.monotonic() - t0 < 5.0  # not indexing_wait_s: nobody announced itself
    assert choice.fallback is not None and "data.rag.discovery_timeout_s = 0.5 s" in choice.fallback.reason


def test_reusing_a_dataset_packed_after_a_fallback_warns_again(
    corpus_root: Path, link: SynapseLink, client: redis.Redis
) -> None:
    config = rag_config(retriever="auto", discovery_timeout_s=0.3)
    first = prepare(corpus_root, config, link)  # no Cyrex: packed by the local index, a fallback
    assert not first.reused and len(first.manifest.rag.fallbacks) == 1
    [built] = fallbacks(client)
    second = prepare(corpus_root, config, link)
    assert second.reused and second.manifest.version == first.manifest.version
    events = fallbacks(client)
    assert len(events) == 2, [e.payload.reason for e in events]
    again = events[1].payload
    assert again.stage == "data" and again.to_retriever == "local-bm25" and again.queries == built.payload.queries
    assert again.reason.startswith(f"dataset {first.manifest.version} reused as packed after a fallback: ")
    assert again.reason.endswith(built.payload.reason)
    assert events[1].run_id == "run-rag"

    # A dataset packed without a fallback is reused silently.
    local = rag_config(retriever="local")
    prepare(corpus_root, local, link)
    assert prepare(corpus_root, local, link).reused
    assert len(fallbacks(client)) == 2


@pytest.mark.parametrize("value", [-1.0, 3601.0, "soon"])
def test_indexing_wait_s_is_validated_naming_the_field(value: object) -> None:
    with pytest.raises(ValidationError, match="indexing_wait_s"):
        RagConfig(indexing_wait_s=value)


def test_a_bad_indexing_wait_s_in_a_run_config_fails_at_the_request_naming_the_field(tmp_path: Path) -> None:
    import yaml

    from helox.runconfig import load_run_config
    from shared.config import ConfigError

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "data": {"rag": {"indexing_wait_s": -5}}}))
    with pytest.raises(ConfigError) as exc:
        load_run_config(path)
    assert "rag.indexing_wait_s" in str(exc.value) and str(path) in str(exc.value)
