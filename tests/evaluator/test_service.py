"""Evaluator instances as real processes in one consumer group, on a real Redis:
each checkpoint is judged once, however many instances run and whichever dies."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import redis
import torch

from contracts import CheckpointSaved, EvaluationCompleted, Producer
from contracts.codec import envelope
from shared.artifacts import ArtifactStore
from shared.data.manifest import load_manifest
from shared.runs import write_run_config
from tests.bus.helpers import publish, read_all, stop, wait_for, wait_for_group

from .helpers import build_dataset, save, tiny_model

TRAINER = Producer(service="trainer", instance="trainer-test")


def _evaluator(env: dict[str, str], name: str, tmp: Path) -> subprocess.Popen[bytes]:
    log = open(tmp / f"{name}.log", "ab")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "services.evaluator"],
                            env={**env, "HELOX_INSTANCE": name, "OMP_NUM_THREADS": "1"},
                            stdout=log, stderr=subprocess.STDOUT)


def _checkpoints(store: ArtifactStore, n: int) -> tuple[str, list[CheckpointSaved]]:
    manifest = build_dataset(store.root.parent / "corpus-root", n_prose=80, n_code=60)
    # The dataset must live in the store the services use.
    version = load_manifest(manifest).version
    target = store.path("datasets", version)
    target.parent.mkdir(parents=True, exist_ok=True)
    manifest.parent.rename(target)
    events = []
    for i in range(n):
        model = tiny_model(target / "manifest.json", seed=i, n_layer=2, d_model=64, ffn_hidden=192)
        path = save(model, store.path("runs", "r1", "checkpoints"), 10 * (i + 1), dataset_version=version)
        ref = store.ref(path / "manifest.json")
        events.append(CheckpointSaved(step=10 * (i + 1), tokens_seen=0, checkpoint=ref, digest=ref.sha256,
                                      dataset_version=version))
    return version, events


def test_checkpoints_are_each_judged_once_even_when_an_evaluator_dies(
    redis_url: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    store = ArtifactStore(subprocess_env["HELOX_ARTIFACTS"])
    _version, events = _checkpoints(store, 5)
    env = {**subprocess_env, "HELOX_RECLAIM_IDLE_MS": "2000"}
    client = redis.Redis.from_url(redis_url)
    workers = [_evaluator(env, f"evaluator-{i}", tmp_path) for i in (1, 2, 3)]
    try:
        wait_for_group(client, "helox.train.checkpoint-saved", "evaluator")
        for ev in events:
            publish(client, envelope(ev, producer=TRAINER, run_id="r1"))

        # Kill whichever instance is busy first, mid-evaluation.
        def busy_instance() -> str | None:
            pending = client.xpending_range("helox.train.checkpoint-saved", "evaluator", "-", "+", 10)
            return pending[0]["consumer"].decode() if pending else None

        victim = wait_for(busy_instance, timeout=60, what="an evaluator to claim a checkpoint")
        victim_proc = workers[int(victim.rsplit("-", 1)[1]) - 1]
        victim_proc.send_signal(signal.SIGKILL)
        victim_proc.wait()

        results = wait_for(lambda: len(read_all(client, EvaluationCompleted)) >= 5 and read_all(client, EvaluationCompleted),
                           timeout=180, what="every checkpoint evaluated")
        digests = [r.payload.checkpoint_digest for r in results]
        assert sorted(digests) == sorted(e.digest for e in events)  # each exactly once
        assert all(r.payload.verdict in ("pass", "regression") for r in results)
        assert all(r.payload.results is not None for r in results)  # written before the ack
        wait_for(lambda: client.xpending("helox.train.checkpoint-saved", "evaluator")["pending"] == 0,
                 what="every entry acked")
        assert len({r.payload.evaluator for r in results}) >= 2  # the work was shared
    finally:
        for proc in workers:
            if proc.poll() is None:
                stop(proc)


def test_a_corrupt_checkpoint_gets_an_error_verdict(redis_url: str, subprocess_env: dict[str, str], tmp_path: Path) -> None:
    torch.set_num_threads(1)
    store = ArtifactStore(subprocess_env["HELOX_ARTIFACTS"])
    _version, (ev,) = _checkpoints(store, 1)
    weights = store.resolve(ev.checkpoint.uri).parent / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-10] ^= 0xFF
    weights.write_bytes(bytes(raw))
    client = redis.Redis.from_url(redis_url)
    proc = _evaluator(subprocess_env, "evaluator-1", tmp_path)
    try:
        wait_for_group(client, "helox.train.checkpoint-saved", "evaluator")
        publish(client, envelope(ev, producer=TRAINER, run_id="r1"))
        (result,) = wait_for(lambda: read_all(client, EvaluationCompleted), timeout=60, what="an error verdict")
        assert result.payload.verdict == "error" and "model.safetensors" in (result.payload.error or "")
        assert proc.poll() is None  # no crash loop
    finally:
        assert stop(proc) == 0


def test_the_runs_eval_section_comes_from_the_config_the_checkpoint_references(
    redis_url: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    store = ArtifactStore(subprocess_env["HELOX_ARTIFACTS"])
    _version, (configured, unconfigured) = _checkpoints(store, 2)
    ref = write_run_config(store, "r1", {"name": "r1", "eval": {"suites_dir": None, "parity": {"enabled": False}}})
    configured.run_config = ref
    client = redis.Redis.from_url(redis_url)
    proc = _evaluator(subprocess_env, "evaluator-1", tmp_path)
    try:
        wait_for_group(client, "helox.train.checkpoint-saved", "evaluator")
        publish(client, envelope(configured, producer=TRAINER, run_id="r1"))
        publish(client, envelope(unconfigured, producer=TRAINER, run_id="r1"))
        results = wait_for(lambda: len(read_all(client, EvaluationCompleted)) == 2 and read_all(client, EvaluationCompleted),
                           timeout=180, what="both checkpoints evaluated")
        by_digest = {r.payload.checkpoint_digest: r.payload for r in results}
        with_ref, without = by_digest[configured.digest], by_digest[unconfigured.digest]
        assert with_ref.suite_scores == {} and with_ref.parity == {}  # the run's section: no suites, no parity
        assert with_ref.run_config == ref  # carried on to the exporter
        assert without.suite_scores and without.parity and without.run_config is None  # the defaults
    finally:
        assert stop(proc) == 0
