"""The health-monitor service as a real process on a real Redis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import redis

from contracts import ArtifactRef, HealthAlert, Producer, TrainingMetrics, TrainingStarted
from contracts.codec import envelope
from shared.artifacts import ArtifactStore
from shared.runs import write_run_config
from tests.bus.helpers import publish, read_all, stop, wait_for, wait_for_group
from tests.health.helpers import clean_series

TRAINER = Producer(service="trainer", instance="trainer-test")


def _metrics(step: int, loss: float) -> TrainingMetrics:
    return TrainingMetrics(step=step, tokens_seen=step * 1024, loss=loss, lr=1e-3, grad_norm=1.0,
                           seq_len=64, batch_size=16, tokens_per_s=2000.0)


def _start(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "services.health_monitor"],
                            env={**env, "HELOX_INSTANCE": "health-monitor-1"}, stdout=log, stderr=subprocess.STDOUT)


def test_nan_loss_raises_one_alert_and_a_restart_does_not_repeat_it(
    redis_url: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    mon = _start(subprocess_env, tmp_path / "first.log")
    try:
        wait_for_group(client, "helox.train.metrics", "health-monitor")
        publish(client, envelope(TrainingStarted(dataset_version="d", model_preset="tiny", n_params=10, total_steps=100,
                                                 device="cpu", precision="fp32"), producer=TRAINER, run_id="r1"))
        for step in range(1, 40):
            publish(client, envelope(_metrics(step, 5.0 / step**0.3), producer=TRAINER, run_id="r1"))
        bad = envelope(_metrics(40, float("nan")), producer=TRAINER, run_id="r1")
        publish(client, bad)
        (alert,) = wait_for(lambda: read_all(client, HealthAlert), timeout=30, what="a non-finite alert")
        assert alert.payload.kind == "non_finite" and alert.payload.severity == "critical"
        assert alert.payload.recommended_action == "rollback"
        assert alert.run_id == "r1" and alert.causation_id == bad.event_id
    finally:
        assert stop(mon) == 0
    # A restarted monitor rebuilds from history: the same incident is not alerted again.
    mon = _start(subprocess_env, tmp_path / "second.log")
    try:
        wait_for(lambda: b"service started" in (tmp_path / "second.log").read_bytes(), timeout=30,
                 what="the monitor to rebuild")
        publish(client, envelope(_metrics(41, float("nan")), producer=TRAINER, run_id="r1"))
        last = publish(client, envelope(_metrics(42, float("nan")), producer=TRAINER, run_id="r1"))

        def consumed() -> bool:
            (group,) = client.xinfo_groups("helox.train.metrics")
            return group["last-delivered-id"].decode() == last and group["pending"] == 0

        wait_for(consumed, timeout=30, what="metrics consumed")
        firing = [a for a in read_all(client, HealthAlert) if a.payload.state == "firing"]
        assert len(firing) == 1
    finally:
        assert stop(mon) == 0


def _consumed(client: redis.Redis, stream: str, last: str) -> bool:
    (group,) = client.xinfo_groups(stream)
    return group["last-delivered-id"].decode() == last and group["pending"] == 0


def _started(client: redis.Redis, run_id: str, ref: ArtifactRef | None) -> str:
    return publish(client, envelope(TrainingStarted(dataset_version="d", model_preset="tiny", n_params=10,
                                                    total_steps=1000, device="cpu", precision="fp32", run_config=ref),
                                    producer=TRAINER, run_id=run_id))


def test_a_runs_health_thresholds_change_what_the_service_alerts_on(
    redis_url: str, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    store = ArtifactStore(subprocess_env["HELOX_ARTIFACTS"])
    refs = {
        "tight": write_run_config(store, "tight", {"name": "tight", "stages": ["data", "train"], "health": {
            "loss_spike": {"z_threshold": 4.0, "min_rel_jump": 0.02}}}),
        "default": write_run_config(store, "default", {"name": "default", "stages": ["data", "train"]}),
        "no-ref": None,  # a TrainingStarted without a config reference: the deployment's thresholds
    }
    series = clean_series(70, noise=0.003)
    for k in (40, 60):
        series[k].loss *= 1.04  # spikes under the default min_rel_jump (5%), over the tight run's (2%)
    client = redis.Redis.from_url(redis_url)

    def feed(ms: list[TrainingMetrics]) -> None:
        last = ""
        for m in ms:  # the same metrics stream for every run, interleaved
            for run_id in refs:
                last = publish(client, envelope(m, producer=TRAINER, run_id=run_id))
        wait_for(lambda: _consumed(client, "helox.train.metrics", last), timeout=60, what="metrics consumed")

    def firing() -> list[tuple[str | None, str, int]]:
        return [(a.run_id, a.payload.kind, a.payload.step_start) for a in read_all(client, HealthAlert)
                if a.payload.state == "firing"]

    mon = _start(subprocess_env, tmp_path / "first.log")
    try:
        wait_for_group(client, "helox.train.metrics", "health-monitor")
        wait_for_group(client, "helox.train.started", "health-monitor")
        for run_id, ref in refs.items():
            last = _started(client, run_id, ref)
        # The runs' configs are in place before their metrics arrive (as the trainer's ordered outbox has it).
        wait_for(lambda: _consumed(client, "helox.train.started", last), timeout=30, what="TrainingStarted consumed")
        feed(series[:50])
        wait_for(firing, timeout=30, what="the tight run's alert")
        assert firing() == [("tight", "loss_spike", series[40].step)]
    finally:
        assert stop(mon) == 0
    # A restarted monitor finds each run's config again from the TrainingStarted it replays.
    mon = _start(subprocess_env, tmp_path / "second.log")
    try:
        wait_for(lambda: b"service started" in (tmp_path / "second.log").read_bytes(), timeout=30,
                 what="the monitor to rebuild")
        feed(series[50:])
        wait_for(lambda: len(firing()) == 2, timeout=30, what="the tight run's second alert")
        assert firing() == [("tight", "loss_spike", series[40].step), ("tight", "loss_spike", series[60].step)]
    finally:
        assert stop(mon) == 0
