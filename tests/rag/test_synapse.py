"""Retrieval over Synapse: real Redis, a real retriever process (tests/rag/responder.py, speaking the
contracts), data prep's retrieval stage asking it; discovery, fallbacks, dead letters, leakage."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from contracts import (
    DeadLetter,
    RetrievalCompleted,
    RetrievalFallback,
    RetrievalRequested,
    RetrieverHeartbeat,
    topic_for,
)
from contracts.codec import decode
from services.data_prep.pipeline import plan_version
from services.data_prep.retrieval import duplicate_clusters
from shared.artifacts import ArtifactStore
from shared.bus.wire import read_entry
from shared.retrieval import RetrieverUnavailableError, SynapseLink, discover
from tests.bus.helpers import wait_for

from .conftest import PREFIX, prepare, rag_config, report

Start = Callable[..., subprocess.Popen[bytes]]


def events(client: redis.Redis, payload: type) -> list:
    return [decode(read_entry(f)[0], payload) for _, f in client.xrange(topic_for(payload).stream(PREFIX))]


def wait_ready(link: SynapseLink, instance: str) -> None:
    wait_for(lambda: (hb := discover(link, 0.2)) is not None and hb.instance == instance, 20, f"{instance} heartbeat")


def test_a_live_retriever_is_discovered_and_serves_every_window(
    corpus_root: Path, link: SynapseLink, client: redis.Redis, responder: Start
) -> None:
    local = prepare(corpus_root, rag_config(retriever="local"))
    proc = responder("twice", "cyrex-a")  # every answer arrives twice: the first counts
    wait_ready(link, "cyrex-a")
    result = prepare(corpus_root, rag_config(retriever="auto"), link)
    rag = result.manifest.rag
    windows = sum(rag.windows.values())
    assert rag.retriever == "cyrex:cyrex-a" and rag.fallbacks == []
    assert rag.queries_by_retriever == {"cyrex:cyrex-a": windows}
    assert rag.windows == local.manifest.rag.windows  # the same windows, other context
    assert rag.retriever_index_digest == events(client, RetrieverHeartbeat)[0].payload.index_digest
    assert result.manifest.version != local.manifest.version  # the version names the retriever and its index
    assert all(c["source_id"].startswith("cyrex-doc-") for line in report(result) for c in line["chunks"])
    assert client.xlen(topic_for(DeadLetter).stream(PREFIX)) == 0
    requests = events(client, RetrievalRequested)
    assert all(r.payload.retriever == "cyrex-a" and r.run_id == "run-rag" for r in requests)
    assert sum(len(r.payload.queries) for r in requests) == windows
    assert len(events(client, RetrievalCompleted)) == 2 * len(requests)

    # A retriever whose heartbeats stopped is not live once 3 intervals have passed.
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    time.sleep(3 * 0.5 + 0.3)
    assert discover(link, 0.3) is None


def test_cyrex_sigkilled_mid_retrieval_leaves_a_complete_dataset_via_the_local_index(
    corpus_root: Path, link: SynapseLink, client: redis.Redis, responder: Start
) -> None:
    proc = responder("ok", "cyrex-b", "--delay", "0.15")
    wait_ready(link, "cyrex-b")
    completed = topic_for(RetrievalCompleted).stream(PREFIX)

    def kill_after_first_answers() -> None:
        wait_for(lambda: client.xlen(completed) >= 3, 60, "Cyrex's first answers")
        proc.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_after_first_answers)
    killer.start()
    result = prepare(corpus_root, rag_config(retriever="auto", request_timeout_s=1.5, batch_queries=8), link)
    killer.join()
    assert proc.wait(10) == -signal.SIGKILL
    rag = result.manifest.rag
    windows = sum(rag.windows.values())
    served = rag.queries_by_retriever
    assert set(served) == {"cyrex:cyrex-b", "local-bm25"} and sum(served.values()) == windows
    assert served["cyrex:cyrex-b"] >= 3 * 8
    [fallback] = rag.fallbacks
    assert fallback.from_retriever == "cyrex:cyrex-b" and fallback.to_retriever == "local-bm25"
    assert "rag.request_timeout_s" in fallback.reason and fallback.queries == served["local-bm25"]
    [event] = events(client, RetrievalFallback)
    assert event.payload.stage == "data" and event.payload.queries == fallback.queries
    assert event.payload.reason == fallback.reason and event.run_id == "run-rag"
    lines = report(result)
    assert len(lines) == windows and {x["retriever"] for x in lines} == {"cyrex:cyrex-b", "local-bm25"}
    local_chunks = [c for x in lines if x["retriever"] == "local-bm25" for c in x["chunks"]]
    assert local_chunks and not any(c["source_id"].startswith("cyrex-doc-") for c in local_chunks)
    # A degraded packing is a dataset of its own: a healthy Cyrex later does not reuse it.
    assert result.manifest.version != plan_version(rag_config(retriever="local"), ArtifactStore(corpus_root / "store"),
                                                   corpus_root)
    assert result.manifest_path.parent.name == result.manifest.version


def test_malformed_answers_are_dead_lettered_and_their_queries_retried_locally(
    corpus_root: Path, link: SynapseLink, client: redis.Redis, responder: Start
) -> None:
    responder("malformed", "cyrex-c")
    wait_ready(link, "cyrex-c")
    result = prepare(corpus_root, rag_config(retriever="cyrex", batch_queries=8), link)
    rag = result.manifest.rag
    letters = [e.payload for e in events(client, DeadLetter)]
    assert sorted(x.error_type for x in letters) == ["decode", "mismatch"]
    assert all(x.original_stream == topic_for(RetrievalCompleted).stream(PREFIX) for x in letters)
    mismatch = next(x for x in letters if x.error_type == "mismatch")
    assert "no-such-query" in mismatch.error
    # Request 2 (all 8 queries) and request 3's first query went to the local index; the rest is Cyrex's.
    windows = sum(rag.windows.values())
    assert rag.queries_by_retriever == {"cyrex:cyrex-c": windows - 9, "local-bm25": 9}
    assert [(f.from_retriever, f.queries) for f in rag.fallbacks] == [("cyrex:cyrex-c", 8), ("cyrex:cyrex-c", 1)]
    assert "malformed" in rag.fallbacks[0].reason
    assert [e.payload.queries for e in events(client, RetrievalFallback)] == [8, 1]


def test_a_retriever_returning_the_querys_own_document_is_caught_by_the_leakage_rule(
    corpus_root: Path, link: SynapseLink, responder: Start
) -> None:
    responder("leaky", "cyrex-d")
    wait_ready(link, "cyrex-d")
    result = prepare(corpus_root, rag_config(retriever="cyrex"), link)
    rag = result.manifest.rag
    lines = report(result)
    windows = len(lines)
    removed = [json.loads(x) for x in (result.manifest_path.parent / "dedup_report.jsonl").read_text().splitlines()]
    clusters = duplicate_clusters(removed)
    for line in lines:
        own = set(line["sources"]) | {o for s in line["sources"] for o in clusters.get(s, ())}
        assert not [c for c in line["chunks"] if c["chunk_id"] in ("own#0", "copy#0") or c["source_id"] in own], line
    # Both planted chunks of (nearly) every window were dropped: its own source, and its own text renamed.
    assert rag.leakage_rejected >= 2 * windows - 10
    assert rag.queries_by_retriever == {"cyrex:cyrex-d": windows} and rag.fallbacks == []


def test_rag_retriever_cyrex_without_one_fails_naming_the_setting(corpus_root: Path, link: SynapseLink) -> None:
    with pytest.raises(RetrieverUnavailableError, match=r"data\.rag\.retriever is 'cyrex'.*discovery_timeout_s"):
        prepare(corpus_root, rag_config(retriever="cyrex", discovery_timeout_s=0.5), link)


def test_auto_without_a_live_retriever_packs_locally_and_says_so(
    corpus_root: Path, link: SynapseLink, client: redis.Redis
) -> None:
    result = prepare(corpus_root, rag_config(retriever="auto", discovery_timeout_s=0.5), link)
    rag = result.manifest.rag
    [fallback] = rag.fallbacks
    assert fallback.from_retriever is None and "rag.discovery_timeout_s" in fallback.reason
    assert fallback.queries == sum(rag.windows.values()) == rag.queries_by_retriever["local-bm25"]
    [event] = events(client, RetrievalFallback)
    assert event.payload.from_retriever is None and event.payload.to_retriever == "local-bm25"
    assert client.xlen(topic_for(RetrievalRequested).stream(PREFIX)) == 0
