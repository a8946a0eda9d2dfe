"""The trainer as a real process on a real Redis, when a run does not end well: any error
escaping the job ends the run with RunFailed naming it (not a silent dead letter), and a
cancelled run checkpoints, stops, ends with RunFailed (Cancelled) and is not trained again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from contracts import CheckpointSaved, Producer, RunCancelled, RunFailed, TrainingCompleted, TrainingStarted
from contracts.codec import envelope
from services.data_prep.app import dataset_ready
from services.data_prep.pipeline import PrepareResult, prepare_dataset
from shared.artifacts import ArtifactStore
from shared.runs import write_run_config
from tests.bus.helpers import publish, read_all, stop, wait_for, wait_for_group
from tests.data_prep.conftest import make_config, write_corpus

DATA_PREP = Producer(service="data-prep", instance="data-prep-test")
CLI = Producer(service="cli", instance="cli-test")
TRAIN = {"model": "tiny", "max_steps": 100_000, "batch": {"global_batch_size": 4, "micro_batch_size": 4, "seq_len": 32},
         "checkpoint": {"every": 5, "background": False}, "log": {"every": 5, "wandb": {"mode": "disabled"}},
         "optim": {"warmup_steps": 5}, "probes": {"enabled": False}}


def _trainer(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "services.trainer"],
                            env={**env, "HELOX_INSTANCE": "trainer-1", "OMP_NUM_THREADS": "1"},
                            stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture
def dataset(subprocess_env: dict[str, str], tmp_path: Path) -> tuple[ArtifactStore, PrepareResult]:
    write_corpus(tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        store = ArtifactStore(subprocess_env["HELOX_ARTIFACTS"])
        return store, prepare_dataset(make_config(), store)
    finally:
        os.chdir(cwd)


def _of(client: redis.Redis, payload: type, run_id: str) -> list:
    return [e for e in read_all(client, payload) if e.run_id == run_id]


def test_an_io_error_inside_the_job_fails_the_run_naming_it(
    redis_url: str, subprocess_env: dict[str, str], tmp_path: Path, dataset: tuple[ArtifactStore, PrepareResult]
) -> None:
    store, result = dataset
    run_id = "io-error"
    ref = write_run_config(store, run_id, {"name": run_id, "stages": ["data", "train"], "train": TRAIN})
    client = redis.Redis.from_url(redis_url)
    trainer = _trainer(subprocess_env, tmp_path / "trainer.log")
    try:
        wait_for_group(client, "helox.data.dataset-ready", "trainer")
        publish(client, envelope(dataset_ready(result, store, ref), producer=DATA_PREP, run_id=run_id))
        wait_for(lambda: _of(client, CheckpointSaved, run_id), timeout=120, what="a first checkpoint")
        # The checkpoint directory becomes a file: the next (synchronous) write raises an OSError.
        checkpoints = store.path("runs", run_id, "checkpoints")
        shutil.move(checkpoints, checkpoints.with_name("checkpoints.moved"))
        checkpoints.write_text("not a directory")
        (failed,) = wait_for(lambda: _of(client, RunFailed, run_id), timeout=120, what="RunFailed")
        assert failed.payload.stage == "train"
        # Which OSError depends on where in the write it struck; a plain OSError either way.
        assert failed.payload.error_type in {"FileExistsError", "NotADirectoryError", "FileNotFoundError"}, failed.payload
        assert failed.payload.error_type in failed.payload.reason and "checkpoints" in failed.payload.reason
        wait_for(lambda: client.xpending("helox.data.dataset-ready", "trainer")["pending"] == 0, what="the ack")
        assert not client.exists("helox.dlq")  # answered, not dead-lettered
        assert not _of(client, TrainingCompleted, run_id)
    finally:
        assert stop(trainer) == 0


def test_a_cancelled_run_checkpoints_stops_fails_as_cancelled_and_is_not_trained_again(
    redis_url: str, subprocess_env: dict[str, str], tmp_path: Path, dataset: tuple[ArtifactStore, PrepareResult]
) -> None:
    store, result = dataset
    run_id = "cancel-me"
    ref = write_run_config(store, run_id, {"name": run_id, "stages": ["data", "train"], "train": TRAIN})
    client = redis.Redis.from_url(redis_url)
    ready = envelope(dataset_ready(result, store, ref), producer=DATA_PREP, run_id=run_id)
    trainer = _trainer(subprocess_env, tmp_path / "trainer.log")
    try:
        wait_for_group(client, "helox.data.dataset-ready", "trainer")
        wait_for_group(client, "helox.runs.cancelled", "trainer-control-trainer-1")
        publish(client, ready)
        wait_for(lambda: _of(client, CheckpointSaved, run_id), timeout=120, what="training under way")
        publish(client, envelope(RunCancelled(reason="abandoned by its helox run"), producer=CLI, run_id=run_id))
        (failed,) = wait_for(lambda: _of(client, RunFailed, run_id), timeout=120, what="RunFailed")
        assert (failed.payload.stage, failed.payload.error_type) == ("train", "Cancelled")
        assert "abandoned by its helox run" in failed.payload.reason
        last = _of(client, CheckpointSaved, run_id)[-1].payload
        # Checkpointed where it stopped (by the stop itself, or by the interval at that very step).
        assert last.reason in {"command", "interval"} and f"step {last.step}" in failed.payload.reason
        wait_for(lambda: client.xpending("helox.data.dataset-ready", "trainer")["pending"] == 0, what="the ack")

        # The same dataset again (a replay): the cancelled run is not trained again.
        publish(client, envelope(dataset_ready(result, store, ref), producer=DATA_PREP, run_id=run_id))
        wait_for(lambda: client.xpending("helox.data.dataset-ready", "trainer")["pending"] == 0
                 and client.xinfo_groups("helox.data.dataset-ready")[0]["entries-read"] == 2, what="the replay's ack")
        assert len(_of(client, TrainingStarted, run_id)) == 1
        assert not _of(client, TrainingCompleted, run_id)
    finally:
        assert stop(trainer) == 0
