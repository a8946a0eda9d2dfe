"""The data-prep service as a real process on a real Redis: RunRequested -> DatasetReady."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import redis

from contracts import DataPrepProgress, DatasetReady, RunFailed
from shared.artifacts import ArtifactStore
from shared.runs import read_run_config, request_config, write_run_config
from tests.bus.helpers import publish, read_all, run_request, stop, wait_for, wait_for_group

from .conftest import make_config, write_corpus


def _start(env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    log = open(cwd / "data-prep.log", "ab")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "services.data_prep"], env={**env, "HELOX_INSTANCE": "data-prep-1"},
                            cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


def _config_sections() -> dict:
    cfg = make_config().model_dump(mode="json")
    return {"corpus": cfg.pop("corpus"), "data": cfg}


def test_run_requested_yields_dataset_ready_and_redelivery_does_not_redo(
    redis_url: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    write_corpus(tmp_path)
    client = redis.Redis.from_url(redis_url)
    proc = _start(subprocess_env, tmp_path)
    try:
        wait_for_group(client, "helox.runs.requested", "data-prep")
        request = run_request("prep-1", **_config_sections())
        publish(client, request)
        (ready,) = wait_for(lambda: read_all(client, DatasetReady), timeout=120, what="DatasetReady")
        assert ready.causation_id == request.event_id and ready.run_id == "prep-1"
        payload = ready.payload
        assert set(payload.domains) == {"code", "prose"} and payload.tokens["train"] > 0
        store = ArtifactStore(subprocess_env["HELOX_ARTIFACTS"])
        store.open_verified(payload.manifest)  # digest and size match the reference
        store.open_verified(payload.tokenizer)
        # No config reference in the request: data-prep wrote the run's config file itself.
        assert payload.run_config is not None
        assert store.resolve(payload.run_config.uri) == store.path("runs", "prep-1", "config.json")
        assert read_run_config(store, payload.run_config) == request_config(request.payload)
        stages = {e.payload.stage for e in read_all(client, DataPrepProgress)}
        assert {"ingest", "near_dedup", "tokenize", "manifest"} <= stages

        # The same entry delivered again (e.g. replayed): no second dataset event.
        publish(client, request)
        second = run_request("prep-2", **_config_sections())  # same inputs, new run: reused
        publish(client, second)
        wait_for(lambda: len(read_all(client, DatasetReady)) == 2, timeout=60, what="the second run's DatasetReady")
        readies = read_all(client, DatasetReady)
        assert [e.run_id for e in readies] == ["prep-1", "prep-2"]
        assert readies[1].payload.reused and readies[1].payload.dataset_version == payload.dataset_version
    finally:
        assert stop(proc) == 0


def test_bad_corpus_fails_the_run_with_the_reason(redis_url: str, subprocess_env: dict[str, str], tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url)
    proc = _start(subprocess_env, tmp_path)
    try:
        wait_for_group(client, "helox.runs.requested", "data-prep")
        sections = _config_sections()
        sections["corpus"]["sources"][0]["path"] = "/etc/passwd"
        publish(client, run_request("bad", **sections))
        (failed,) = wait_for(lambda: read_all(client, RunFailed), timeout=60, what="RunFailed")
        assert failed.payload.stage == "data" and "/etc/passwd" in failed.payload.reason
        assert not failed.payload.retriable
        wait_for(lambda: client.xpending("helox.runs.requested", "data-prep")["pending"] == 0, what="the ack")
    finally:
        assert stop(proc) == 0


def test_the_requests_config_reference_is_read_and_carried_on(
    redis_url: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    write_corpus(tmp_path)
    store = ArtifactStore(subprocess_env["HELOX_ARTIFACTS"])
    client = redis.Redis.from_url(redis_url)
    proc = _start(subprocess_env, tmp_path)
    try:
        wait_for_group(client, "helox.runs.requested", "data-prep")
        # The referenced file is what counts: the inline copy here would fail the run.
        request = run_request("by-ref", corpus={"sources": [{"path": "/etc/passwd", "domain": "x"}], "roots": ["/"]})
        request.payload.run_config = write_run_config(store, "by-ref", {"name": "by-ref", **_config_sections()})
        publish(client, request)
        (ready,) = wait_for(lambda: read_all(client, DatasetReady), timeout=120, what="DatasetReady")
        assert ready.payload.run_config == request.payload.run_config
        assert ready.payload.documents > 0 and not read_all(client, RunFailed)

        # A reference whose file changed since it was written fails the run, naming the file.
        tampered = run_request("tampered", **_config_sections())
        tampered.payload.run_config = write_run_config(store, "tampered", {"name": "tampered", **_config_sections()})
        path = store.resolve(tampered.payload.run_config.uri)
        path.write_bytes(path.read_bytes().replace(b'"tampered"', b'"tampere2"'))
        publish(client, tampered)
        (failed,) = wait_for(lambda: read_all(client, RunFailed), timeout=60, what="RunFailed")
        assert failed.run_id == "tampered" and "does not match its reference" in failed.payload.reason
        assert str(path) in failed.payload.reason and not failed.payload.retriable
    finally:
        assert stop(proc) == 0
