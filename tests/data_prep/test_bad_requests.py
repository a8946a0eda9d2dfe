"""Every bad request is answered: one real Redis and one real data-prep process (the first
consumer of every RunRequested) for the whole module, fed

- every bus-level poison entry (tests/bus/test_poison.py's POISON: wrong types, a missing
  event id, an unknown major version, a 5 MB payload, non-UTF-8 field names, no data
  field...): each is dead-lettered once with its precise reason (a newer minor with an extra
  field is accepted and answered);
- a bad value in each section of the run config: RunFailed at stage `request`, naming the
  field (`section.field`), before any work (no progress, no config file written);
- corpus roots outside the deployment's (HELOX_CORPUS_ROOTS): refused the same way;

and nothing is left pending. A symlink escaping the roots is skipped and counted (the run
succeeds); a cancelled run's request is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from contracts import DataPrepProgress, DatasetReady, DeadLetter, Envelope, RunCancelled, RunFailed
from contracts.codec import envelope
from shared.artifacts import ArtifactStore
from shared.bus.admin import decode_entry
from shared.data.manifest import load_manifest
from shared.redis_server import RedisServer
from tests.bus.helpers import PRODUCER, publish, read_all, run_request, stop, wait_for, wait_for_group
from tests.bus.test_poison import POISON

from .conftest import write_corpus

STREAM = "helox.runs.requested"
GROUP = "data-prep"


class Stack:
    def __init__(self, tmp: Path, server: RedisServer, proc: subprocess.Popen[bytes]) -> None:
        self.tmp, self.server, self.proc = tmp, server, proc
        self.client = redis.Redis.from_url(server.url)
        self.deploy = tmp / "deploy"
        self.store = ArtifactStore(tmp / "artifacts")

    def sections(self, **changes: Any) -> dict[str, Any]:
        """Valid corpus/data sections over the deployment's corpus, with `changes` laid over
        (a dotted key sets one field: {"data.minhash.threshold": 1.5})."""
        corpus = self.deploy / "corpus"
        config: dict[str, Any] = {
            "corpus": {"sources": [{"path": str(corpus / "prose"), "domain": "prose"},
                                   {"path": str(corpus / "code"), "domain": "code"}],
                       "roots": [str(corpus)]},
            "data": {"filters": {"min_doc_chars": 32}, "tokenizer": {"vocab_size": 400},
                     "sharding": {"shard_tokens": 4000, "val_fraction": 0.1, "workers": 1}},
            "train": {"model": "tiny", "max_steps": 10},
        }
        for dotted, value in changes.items():
            *path, last = dotted.split(".")
            node = config
            for part in path:
                node = node.setdefault(part, {})
            node[last] = value
        return config

    def dead_letters(self) -> dict[str, DeadLetter]:
        out = {}
        for _id, fields in self.client.xrange("helox.dlq"):
            env = decode_entry(fields)
            assert env is not None and isinstance(env.payload, DeadLetter)
            out[env.payload.original_id] = env.payload
        return out

    def failure_of(self, run_id: str) -> Envelope[RunFailed]:
        (failed,) = wait_for(lambda: [e for e in read_all(self.client, RunFailed) if e.run_id == run_id],
                             timeout=60, what=f"RunFailed of {run_id}")
        return failed

    def nothing_pending(self) -> None:
        wait_for(lambda: self.client.xpending(STREAM, GROUP)["pending"] == 0, timeout=30, what="nothing pending")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("bad-requests")
    write_corpus(tmp / "deploy")
    (tmp / "outside").mkdir()
    (tmp / "outside" / "secret.txt").write_text("a file of the host that no run may read\n" * 20)
    server = RedisServer(tmp / "redis")
    server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELOX_")}
    env.update(
        HELOX_REDIS_URL=server.url, HELOX_ARTIFACTS=str(tmp / "artifacts"), HELOX_STATE_DIR=str(tmp / "state"),
        HELOX_RECLAIM_IDLE_MS="1000", HELOX_POLLING_INTERVAL_MS="50", HELOX_MAX_DELIVERIES="3",
        HELOX_HEARTBEAT_INTERVAL_S="0.5", HELOX_LOG_FORMAT="json", HELOX_INSTANCE="data-prep-1",
        HELOX_CORPUS_ROOTS=str(tmp / "deploy"), OMP_NUM_THREADS="1",
    )
    log = open(tmp / "data-prep.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "services.data_prep"], env=env, cwd=tmp, stdout=log,
                            stderr=subprocess.STDOUT)
    s = Stack(tmp, server, proc)
    try:
        wait_for_group(s.client, STREAM, GROUP, timeout=60)
        yield s
    finally:
        try:
            assert stop(proc) == 0
        finally:
            log.close()
            server.stop()


# --- the bus: poison entries --------------------------------------------------------------


@pytest.mark.parametrize("poison", POISON, ids=[p.name for p in POISON])
def test_a_poison_request_is_dead_lettered_with_its_reason(stack: Stack, poison: Any) -> None:
    entry_id = stack.client.xadd(STREAM, poison.fields()).decode()
    if poison.error_type is None:
        # Accepted (a newer minor version with a field this consumer does not know) and
        # answered: its config is the default corpus, outside this deployment's roots.
        failed = stack.failure_of("v1.99")
        assert failed.payload.stage == "request" and "corpus.roots.0" in failed.payload.reason
        assert entry_id not in stack.dead_letters()
    else:
        letter = wait_for(lambda: stack.dead_letters().get(entry_id), timeout=30, what=f"the dead letter of {poison.name}")
        assert (letter.error_type, letter.group, letter.original_stream) == (poison.error_type, GROUP, STREAM)
        assert poison.reason in letter.error, letter.error
    stack.nothing_pending()


# --- the run config: every bad value names its field ---------------------------------------

BAD_CONFIGS = [
    # (case, sections changed, field the RunFailed names)
    ("unknown-model-preset", {"train.model": "gpt-17"}, "train.model"),
    ("negative-lr", {"train.optim.lr": -0.1}, "train.optim.lr"),
    ("seq-len-not-a-number", {"train.batch.seq_len": "long"}, "train.batch.seq_len"),
    ("zero-max-steps", {"train.max_steps": 0}, "train.max_steps"),
    ("unknown-train-key", {"train.optim.lrr": 0.1}, "train.optim.lrr"),
    ("bad-model-override", {"train.model_overrides": {"n_layer": 0}}, "train.model_overrides.n_layer"),
    ("seq-len-beyond-the-model", {"train.batch.seq_len": 100_000}, "train"),
    ("train-not-a-mapping", {"train": "fast"}, "train"),
    ("minhash-threshold-above-1", {"data.minhash.threshold": 1.5}, "data.minhash.threshold"),
    ("tiny-vocab", {"data.tokenizer.vocab_size": 10}, "data.tokenizer.vocab_size"),
    ("bad-domain-name", {"corpus.sources": [{"path": "x", "domain": "bad domain!"}]}, "corpus.sources.0.domain"),
    ("corpus-without-sources", {"corpus.sources": []}, "corpus.sources"),
    ("eval-confidence-above-1", {"eval.confidence": 2.0}, "eval.confidence"),
    ("health-threshold-zero", {"health.loss_spike.z_threshold": 0}, "health.loss_spike.z_threshold"),
    ("unknown-health-detector", {"health.loss_spikes": {}}, "health.loss_spikes"),
    ("unknown-export-format", {"export.formats": ["zip"]}, "export.formats.0"),
    ("unknown-top-level-key", {"trian": {"max_steps": 5}}, "trian"),
]


@pytest.mark.parametrize(("case", "changes", "field"), BAD_CONFIGS, ids=[c for c, _, _ in BAD_CONFIGS])
def test_a_bad_config_value_fails_the_run_at_the_request_naming_the_field(
    stack: Stack, case: str, changes: dict[str, Any], field: str
) -> None:
    publish(stack.client, run_request(case, **stack.sections(**changes)))
    failed = stack.failure_of(case).payload
    assert failed.stage == "request" and not failed.retriable
    assert f"\n  {field}:" in failed.reason, failed.reason  # one line per bad field, named in full
    _no_work(stack, case)


def test_a_bad_run_name_fails_at_the_request(stack: Stack) -> None:
    request = run_request("named-badly", **stack.sections())
    request.payload.name = "no spaces allowed!"
    publish(stack.client, request)
    failed = stack.failure_of("named-badly").payload
    assert failed.stage == "request" and "  name:" in failed.reason
    _no_work(stack, "named-badly")


# --- corpus roots: the deployment's bound what a request reads --------------------------------

ESCAPES = [
    ("root-etc", ["/etc"], [{"path": "/etc/*.conf", "domain": "etc"}]),
    ("root-filesystem", ["/"], [{"path": "/etc/hostname", "domain": "etc"}]),
    ("root-relative-escape", ["deploy/.."], [{"path": "outside/secret.txt", "domain": "x"}]),
    ("root-symlink-out", ["deploy/link-out"], [{"path": "deploy/link-out/secret.txt", "domain": "x"}]),
]


@pytest.mark.parametrize(("case", "roots", "sources"), ESCAPES, ids=[c for c, _, _ in ESCAPES])
def test_corpus_roots_outside_the_deployments_fail_at_the_request(
    stack: Stack, case: str, roots: list[str], sources: list[dict[str, str]]
) -> None:
    link = stack.deploy / "link-out"
    if not link.exists():
        link.symlink_to(stack.tmp / "outside")  # inside by name, outside once resolved
    publish(stack.client, run_request(case, **stack.sections(**{"corpus.roots": roots, "corpus.sources": sources})))
    failed = stack.failure_of(case).payload
    assert failed.stage == "request" and "corpus.roots.0" in failed.reason and "HELOX_CORPUS_ROOTS" in failed.reason
    assert str(stack.deploy) in failed.reason  # says what the deployment allows
    _no_work(stack, case)


def test_a_narrower_root_is_accepted_and_a_symlink_out_of_it_is_skipped_and_counted(stack: Stack) -> None:
    corpus = stack.deploy / "corpus"
    (corpus / "prose" / "escape.txt").symlink_to(stack.tmp / "outside" / "secret.txt")
    try:
        publish(stack.client, run_request("narrow", **stack.sections()))
        (ready,) = wait_for(lambda: [e for e in read_all(stack.client, DatasetReady) if e.run_id == "narrow"],
                            timeout=180, what="DatasetReady of the narrowed run")
    finally:
        (corpus / "prose" / "escape.txt").unlink()
    assert not [e for e in read_all(stack.client, RunFailed) if e.run_id == "narrow"]
    manifest = load_manifest(stack.store.open_verified(ready.payload.manifest))
    (ingest,) = [r for r in manifest.stages if r.stage == "ingest"]
    assert ingest.details["outside_roots_skipped"] == 1
    assert ingest.details["outside_roots_files"] == [str(corpus / "prose" / "escape.txt")]
    stack.nothing_pending()


def test_a_cancelled_runs_request_is_skipped(stack: Stack) -> None:
    cancel = envelope(RunCancelled(reason="test"), producer=PRODUCER, run_id="cancelled-first")
    publish(stack.client, cancel)
    wait_for(lambda: stack.client.exists("helox:idem:data-prep:cancelled:cancelled-first"), timeout=30,
             what="data-prep to record the cancellation")
    publish(stack.client, run_request("cancelled-first", **stack.sections()))
    stack.nothing_pending()
    wait_for(lambda: stack.client.xpending("helox.runs.cancelled", GROUP)["pending"] == 0, what="the cancel's ack")
    assert not [e for e in read_all(stack.client, DatasetReady) if e.run_id == "cancelled-first"]
    assert not [e for e in read_all(stack.client, RunFailed) if e.run_id == "cancelled-first"]
    _no_work(stack, "cancelled-first")


def test_every_answer_is_one_event_and_nothing_is_left_pending(stack: Stack) -> None:
    stack.nothing_pending()
    failed = [e.run_id for e in read_all(stack.client, RunFailed)]
    assert len(failed) == len(set(failed)), "a request was answered twice"
    letters = stack.dead_letters()
    assert len(letters) == sum(p.error_type is not None for p in POISON)


def _no_work(stack: Stack, run_id: str) -> None:
    """Refused before any work: no progress, no dataset, no config file written."""
    stack.nothing_pending()
    assert not [e for e in read_all(stack.client, DataPrepProgress) if e.run_id == run_id]
    assert not [e for e in read_all(stack.client, DatasetReady) if e.run_id == run_id]
    assert not stack.store.path("runs", run_id, "config.json").exists()
