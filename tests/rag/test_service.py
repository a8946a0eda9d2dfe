"""RAG packing through the services: the data-prep process, a retriever process and a real Redis.
RunRequested (data.rag) -> retrieval over Synapse -> Cyrex SIGKILLed mid-way -> DatasetReady of a
complete dataset, the fallback announced as RetrievalFallback (caused by the request)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import redis

from contracts import DatasetReady, RetrievalCompleted, RetrievalFallback, RunFailed, topic_for
from shared.artifacts import ArtifactStore
from shared.data.manifest import load_manifest
from tests.bus.helpers import publish, read_all, run_request, stop, wait_for, wait_for_group

from .conftest import PREFIX, rag_config


def _start(env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    log = open(cwd / "data-prep.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "services.data_prep"], env={**env, "HELOX_INSTANCE": "data-prep-1"},
                            cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


def _sections(**rag: object) -> dict:
    cfg = rag_config(**rag).model_dump(mode="json")
    return {"corpus": cfg.pop("corpus"), "data": cfg}


def test_a_run_packs_through_cyrex_and_survives_its_death(
    redis_url: str, subprocess_env: dict[str, str], corpus_root: Path, responder
) -> None:
    client = redis.Redis.from_url(redis_url)
    cyrex = responder("ok", "cyrex-svc", "--delay", "0.15")
    proc = _start(subprocess_env, corpus_root)
    try:
        wait_for_group(client, "helox.runs.requested", "data-prep")
        request = run_request("rag-1", **_sections(retriever="auto", request_timeout_s=1.5, batch_queries=8))
        publish(client, request)
        completed = topic_for(RetrievalCompleted).stream(PREFIX)
        wait_for(lambda: client.xlen(completed) >= 3, 120, "Cyrex's first answers")
        cyrex.send_signal(signal.SIGKILL)
        (ready,) = wait_for(lambda: read_all(client, DatasetReady), timeout=180, what="DatasetReady")
        assert ready.run_id == "rag-1" and ready.causation_id == request.event_id
        (fallback,) = read_all(client, RetrievalFallback)
        assert fallback.run_id == "rag-1" and fallback.causation_id == request.event_id
        assert fallback.payload.from_retriever == "cyrex:cyrex-svc" and fallback.payload.to_retriever == "local-bm25"
        manifest = load_manifest(ArtifactStore(subprocess_env["HELOX_ARTIFACTS"]).resolve(ready.payload.manifest.uri))
        rag = manifest.rag
        assert set(rag.queries_by_retriever) == {"cyrex:cyrex-svc", "local-bm25"}
        assert sum(rag.queries_by_retriever.values()) == sum(rag.windows.values())
        assert [f.reason for f in rag.fallbacks] == [fallback.payload.reason]
    finally:
        assert stop(proc) == 0


def test_a_run_requiring_cyrex_without_one_fails_naming_the_setting(
    redis_url: str, subprocess_env: dict[str, str], corpus_root: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    proc = _start(subprocess_env, corpus_root)
    try:
        wait_for_group(client, "helox.runs.requested", "data-prep")
        publish(client, run_request("rag-2", **_sections(retriever="cyrex", discovery_timeout_s=0.5)))
        (failed,) = wait_for(lambda: read_all(client, RunFailed), timeout=120, what="RunFailed")
        assert failed.payload.stage == "data" and "data.rag.retriever is 'cyrex'" in failed.payload.reason
        assert failed.payload.error_type == "RetrieverUnavailableError" and not failed.payload.retriable
    finally:
        assert stop(proc) == 0
