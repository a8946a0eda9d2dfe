"""health-monitor wiring: train.metrics (+ lifecycle events) -> HealthMonitor -> health.alerts.

At start-up the monitor rebuilds its windows from recent history (metrics, lifecycle
events, actions and the alerts already published) so a restart neither misses an
incident nor repeats an alert. A clock task calls `tick` to catch stalled trainers.
Thresholds come from the `health:` section of the HELOX_CONFIG file (defaults otherwise).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from contracts import (
    Envelope,
    HealthAlert,
    RunFailed,
    TrainerAction,
    TrainingCompleted,
    TrainingMetrics,
    TrainingStarted,
    topic_for,
)
from shared.bus import Delivery
from shared.bus.admin import decode_entry
from shared.config import read_yaml
from shared.logging import get_logger
from shared.service import ServiceRuntime

from .config import HealthConfig
from .monitor import HealthMonitor

log = get_logger("helox.health")

HISTORY = {TrainingMetrics: 20_000, TrainingStarted: 1_000, TrainingCompleted: 1_000, RunFailed: 1_000,
           TrainerAction: 5_000, HealthAlert: 5_000}
"""How far back (entries per stream) a restarted monitor reads to rebuild its windows."""
TICK_S = 5.0


def load_health_config() -> HealthConfig:
    path = os.environ.get("HELOX_CONFIG")
    section = read_yaml(Path(path)).get("health", {}) if path else {}
    return HealthConfig.model_validate(section or {})


async def publish_alerts(rt: ServiceRuntime, alerts: list[tuple[str, HealthAlert]], cause: Envelope[Any] | None) -> None:
    for run_id, alert in alerts:
        await rt.bus.publish(alert, run_id=run_id, cause=cause)
        log.warning("health alert", run_id=run_id, kind=alert.kind, state=alert.state, severity=alert.severity,
                    action=alert.recommended_action, message=alert.message)


async def recent_history(rt: ServiceRuntime) -> list[Envelope[Any]]:
    events: list[Envelope[Any]] = []
    for payload, count in HISTORY.items():
        rows = await rt.bus.redis.xrevrange(topic_for(payload).stream(rt.bus.prefix), count=count)
        events += [env for _id, fields in rows if (env := decode_entry(fields)) is not None]
    return events


def setup(rt: ServiceRuntime) -> None:
    monitor = HealthMonitor(load_health_config())
    rt.state["monitor"] = monitor

    async def on_event(env: Envelope[Any], _delivery: Delivery) -> None:
        await publish_alerts(rt, monitor.handle(env, received_at=time.time()), env)

    async def clock() -> None:
        while not rt.stopping.is_set():
            await asyncio.sleep(TICK_S)
            await publish_alerts(rt, monitor.tick(time.time()), None)

    async def rebuild(_rt: ServiceRuntime) -> None:
        history = await recent_history(rt)
        missed = monitor.replay(history)
        log.info("monitor rebuilt from history", events=len(history), unsent_alerts=len(missed))
        await publish_alerts(rt, missed, None)
        rt.state["clock"] = asyncio.create_task(clock(), name="health-clock")

    rt.on_startup(rebuild)
    rt.bus.subscribe(TrainingMetrics, on_event, max_records=100)
    for payload in (TrainingStarted, TrainingCompleted, RunFailed, TrainerAction):
        rt.bus.subscribe(payload, on_event)
