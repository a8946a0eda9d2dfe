"""The trainer as a real process on a real Redis: a SIGTERM mid-run checkpoints and hands
the run back; the restarted instance resumes it and finishes exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis

from contracts import CheckpointSaved, DatasetReady, Producer, RunFailed, TrainingCompleted, TrainingStarted
from contracts.codec import envelope
from services.data_prep.app import dataset_ready
from services.data_prep.pipeline import prepare_dataset
from shared.artifacts import ArtifactStore
from shared.runs import write_run_config
from tests.bus.helpers import publish, read_all, stop, wait_for, wait_for_group
from tests.data_prep.conftest import make_config, write_corpus

DATA_PREP = Producer(service="data-prep", instance="data-prep-test")


def _trainer(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "services.trainer"],
                            env={**env, "HELOX_INSTANCE": "trainer-1", "OMP_NUM_THREADS": "1"},
                            stdout=out, stderr=subprocess.STDOUT)


def test_sigterm_checkpoints_and_the_restarted_trainer_resumes(
    redis_url: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    write_corpus(tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        store = ArtifactStore(subprocess_env["HELOX_ARTIFACTS"])
        result = prepare_dataset(make_config(), store)
    finally:
        os.chdir(cwd)
    train = {"model": "tiny", "max_steps": 1000, "batch": {"global_batch_size": 4, "micro_batch_size": 4, "seq_len": 32},
             "checkpoint": {"every": 10}, "log": {"every": 5, "wandb": {"mode": "disabled"}},
             "optim": {"warmup_steps": 5}}
    run_config = write_run_config(store, "resume-run", {"name": "resume-run", "stages": ["data", "train"],
                                                        "train": train})
    client = redis.Redis.from_url(redis_url)
    ready = envelope(dataset_ready(result, store, run_config), producer=DATA_PREP, run_id="resume-run")
    env = {**subprocess_env, "HELOX_RECLAIM_IDLE_MS": "1500"}
    first = _trainer(env, tmp_path / "first.log")
    try:
        wait_for_group(client, "helox.data.dataset-ready", "trainer")
        publish(client, ready)
        wait_for(lambda: any(c.payload.step >= 10 for c in read_all(client, CheckpointSaved)), timeout=120,
                 what="a few checkpoints")
    finally:
        assert stop(first, timeout=60) == 0  # SIGTERM: checkpoint, hand back, exit cleanly
    assert not read_all(client, TrainingCompleted)
    assert client.xpending("helox.data.dataset-ready", "trainer")["pending"] == 1  # handed back, not acked
    stopped_at = max(c.payload.step for c in read_all(client, CheckpointSaved))

    second = _trainer(env, tmp_path / "second.log")
    try:
        (done,) = wait_for(lambda: read_all(client, TrainingCompleted), timeout=240, what="the resumed run to finish")
        assert done.payload.final_step == 1000
        starts = read_all(client, TrainingStarted)
        assert starts[0].payload.resumed_from_step is None
        assert starts[-1].payload.resumed_from_step == stopped_at
        # The run's config reference travels on to the health monitor, evaluator and exporter.
        assert all(e.payload.run_config == run_config for e in starts + read_all(client, CheckpointSaved))
        assert done.payload.run_config == run_config
        wait_for(lambda: client.xpending("helox.data.dataset-ready", "trainer")["pending"] == 0, what="the ack")
    finally:
        assert stop(second) == 0
    assert len(read_all(client, TrainingCompleted)) == 1
    assert isinstance(ready.payload, DatasetReady)


def test_a_dataset_without_its_runs_config_fails_the_run_naming_why(
    redis_url: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    write_corpus(tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        store = ArtifactStore(subprocess_env["HELOX_ARTIFACTS"])
        result = prepare_dataset(make_config(), store)
    finally:
        os.chdir(cwd)
    client = redis.Redis.from_url(redis_url)
    trainer = _trainer(subprocess_env, tmp_path / "trainer.log")
    try:
        wait_for_group(client, "helox.data.dataset-ready", "trainer")
        publish(client, envelope(dataset_ready(result, store), producer=DATA_PREP, run_id="no-config"))
        changed = write_run_config(store, "changed", {"name": "changed", "train": {"max_steps": 5}})
        path = store.resolve(changed.uri)
        path.write_bytes(path.read_bytes().replace(b"5", b"6"))
        publish(client, envelope(dataset_ready(result, store, changed), producer=DATA_PREP, run_id="changed"))
        failed = wait_for(lambda: len(read_all(client, RunFailed)) == 2 and read_all(client, RunFailed), timeout=60,
                          what="both runs failed")
        reasons = {f.run_id: f.payload.reason for f in failed}
        assert "carries no run_config reference" in reasons["no-config"]
        assert "does not match its reference" in reasons["changed"] and str(path) in reasons["changed"]
        assert not read_all(client, TrainingStarted)
    finally:
        assert stop(trainer) == 0
