"""The trainer service launching a job on 2 local processes (train.distributed.nproc: torchrun,
gloo): real processes on a real Redis. Rank 0 emits the events; the run completes; a rank
SIGKILLed mid-run ends in a requeue and a resume from the last checkpoint, not a hung group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from contracts import CheckpointSaved, Producer, RunFailed, TrainingCompleted, TrainingMetrics, TrainingStarted
from contracts.codec import envelope
from services.data_prep.app import dataset_ready
from services.data_prep.pipeline import prepare_dataset
from shared.artifacts import ArtifactStore
from shared.runs import write_run_config
from tests.bus.helpers import publish, read_all, stop, wait_for, wait_for_group
from tests.data_prep.conftest import make_config, write_corpus

TORCHRUN = Path(sys.executable).parent / "torchrun"
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")
DATA_PREP = Producer(service="data-prep", instance="data-prep-test")
GLOBAL = 4


def _train(max_steps: int, every: int) -> dict:
    return {"model": "tiny", "max_steps": max_steps, "seed": 0,
            "batch": {"global_batch_size": GLOBAL, "micro_batch_size": GLOBAL // 2, "seq_len": 32},
            "checkpoint": {"every": every}, "log": {"every": 5, "wandb": {"mode": "disabled"}},
            "optim": {"warmup_steps": 2}, "probes": {"enabled": False},
            "distributed": {"nproc": 2, "strategy": "ddp", "timeout_s": 60}}


def _start_run(tmp_path: Path, env: dict[str, str], run_id: str, max_steps: int, every: int = 5):
    write_corpus(tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        store = ArtifactStore(env["HELOX_ARTIFACTS"])
        result = prepare_dataset(make_config(), store)
    finally:
        os.chdir(cwd)
    run_config = write_run_config(store, run_id, {"name": run_id, "stages": ["data", "train"],
                                                  "train": _train(max_steps, every)})
    return envelope(dataset_ready(result, store, run_config), producer=DATA_PREP, run_id=run_id)


def _trainer(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "services.trainer"],
                            env={**env, "HELOX_INSTANCE": "trainer-1", "OMP_NUM_THREADS": "1"},
                            stdout=out, stderr=subprocess.STDOUT)


def _rank_pids(state_dir: Path, run_id: str) -> dict[Path, int]:
    return {p: int(p.read_text()) for p in (state_dir / "jobs").glob(f"{run_id}-*/rank-*.pid") if p.read_text()}


def _kill_leftover_groups(state_dir: Path, run_id: str) -> None:
    """A failed test must not leave torchrun groups behind: each rank's group is its torchrun's."""
    for pid in _rank_pids(state_dir, run_id).values():
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_two_rank_job_launched_by_the_service_completes_with_rank_0_on_the_bus(
    redis_url: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    ready = _start_run(tmp_path, subprocess_env, "two-ranks", max_steps=10)
    client = redis.Redis.from_url(redis_url)
    state = Path(subprocess_env["HELOX_STATE_DIR"])
    trainer = _trainer(subprocess_env, tmp_path / "trainer.log")
    try:
        wait_for_group(client, "helox.data.dataset-ready", "trainer")
        publish(client, ready)
        (done,) = wait_for(lambda: read_all(client, TrainingCompleted), timeout=240, what="the 2-rank run to finish")
        assert done.payload.final_step == 10 and done.payload.tokens_seen == 10 * GLOBAL * 32
        (started,) = read_all(client, TrainingStarted)
        assert started.payload.world_size == 2 and started.payload.instance == "trainer-1"
        metrics = read_all(client, TrainingMetrics)
        assert [(m.payload.step, m.payload.data_cursor) for m in metrics] == [(5, 5 * GLOBAL), (10, 10 * GLOBAL)]
        assert {c.payload.step for c in read_all(client, CheckpointSaved)} == {5, 10}
        assert all(e.causation_id == ready.event_id for e in [started, *metrics, done])
        assert not read_all(client, RunFailed)
        wait_for(lambda: client.xpending("helox.data.dataset-ready", "trainer")["pending"] == 0, what="the ack")
        assert len(_rank_pids(state, "two-ranks")) == 2
    finally:
        assert stop(trainer, timeout=60) == 0
        _kill_leftover_groups(state, "two-ranks")


def test_a_rank_killed_mid_run_ends_in_a_requeue_and_a_resume_not_a_hang(
    redis_url: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    ready = _start_run(tmp_path, subprocess_env, "killed-rank", max_steps=40)
    client = redis.Redis.from_url(redis_url)
    state = Path(subprocess_env["HELOX_STATE_DIR"])
    trainer = _trainer({**subprocess_env, "HELOX_RECLAIM_IDLE_MS": "1500"}, tmp_path / "trainer.log")
    try:
        wait_for_group(client, "helox.data.dataset-ready", "trainer")
        publish(client, ready)
        wait_for(lambda: any(c.payload.step >= 10 for c in read_all(client, CheckpointSaved)), timeout=240,
                 what="two checkpoints of the 2-rank job")
        (rank1,) = [pid for p, pid in _rank_pids(state, "killed-rank").items() if p.name == "rank-1.pid"]
        os.kill(rank1, signal.SIGKILL)
        killed_at = time.monotonic()
        starts = wait_for(lambda: len(read_all(client, TrainingStarted)) == 2 and read_all(client, TrainingStarted),
                          timeout=120, what="the relaunch after the killed rank")
        assert time.monotonic() - killed_at < 120
        resumed = starts[-1].payload.resumed_from_step
        assert resumed is not None and resumed >= 10  # from the last checkpoint, not from scratch
        (done,) = wait_for(lambda: read_all(client, TrainingCompleted), timeout=240, what="the resumed run")
        assert done.payload.final_step == 40
        assert not read_all(client, RunFailed)
        wait_for(lambda: client.xpending("helox.data.dataset-ready", "trainer")["pending"] == 0, what="the ack")
    finally:
        assert stop(trainer, timeout=60) == 0
        _kill_leftover_groups(state, "killed-rank")


def test_sigterm_of_one_rank_checkpoints_the_group_hands_the_run_back_and_it_resumes(
    redis_url: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    ready = _start_run(tmp_path, subprocess_env, "sigterm-rank", max_steps=150, every=50)
    client = redis.Redis.from_url(redis_url)
    state = Path(subprocess_env["HELOX_STATE_DIR"])
    trainer = _trainer({**subprocess_env, "HELOX_RECLAIM_IDLE_MS": "1500"}, tmp_path / "trainer.log")
    try:
        wait_for_group(client, "helox.data.dataset-ready", "trainer")
        publish(client, ready)
        wait_for(lambda: read_all(client, CheckpointSaved), timeout=240, what="a checkpoint of the 2-rank job")
        (rank1,) = [pid for p, pid in _rank_pids(state, "sigterm-rank").items() if p.name == "rank-1.pid"]
        os.kill(rank1, signal.SIGTERM)  # relayed to rank 0, which stops the group at one step
        (signalled,) = wait_for(lambda: [c for c in read_all(client, CheckpointSaved) if c.payload.reason == "signal"],
                                timeout=120, what="the checkpoint the SIGTERM asks for")
        (done,) = wait_for(lambda: read_all(client, TrainingCompleted), timeout=240, what="the resumed run")
        assert done.payload.final_step == 150 and signalled.payload.step < 150
        starts = read_all(client, TrainingStarted)
        assert [s.payload.resumed_from_step for s in starts] == [None, signalled.payload.step]
        assert not read_all(client, RunFailed)
    finally:
        assert stop(trainer, timeout=60) == 0
        _kill_leftover_groups(state, "sigterm-rank")
