"""The health-monitor service as a real process on a real Redis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import redis

from contracts import HealthAlert, Producer, TrainingMetrics, TrainingStarted
from contracts.codec import envelope
from tests.bus.helpers import publish, read_all, stop, wait_for, wait_for_group

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
