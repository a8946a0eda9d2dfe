"""health-monitor wiring: train.metrics (+ lifecycle events) -> HealthMonitor -> health.alerts.

At start-up the monitor rebuilds its windows from recent history (metrics, lifecycle
events, actions and the alerts already published) so a restart neither misses an
incident nor repeats an alert. A clock task calls `tick` to catch stalled trainers.

Thresholds, per run: the `health:` section of the run's config file (referenced by the
run's TrainingStarted, `run_config`), laid over the deployment's thresholds (the `health:`
section of the HELOX_CONFIG file; the built-in defaults without one). A run whose
TrainingStarted references no config is judged with the deployment's thresholds.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from contracts import (
    ArtifactRef,
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
from shared.config import ConfigError, describe_validation_error, read_yaml
from shared.logging import get_logger
from shared.runs import RunConfigError, read_run_config
from shared.service import ServiceRuntime

from .config import HealthConfig, run_health_config
from .monitor import HealthMonitor

log = get_logger("helox.health")

HISTORY = {TrainingMetrics: 20_000, TrainingStarted: 1_000, TrainingCompleted: 1_000, RunFailed: 1_000,
           TrainerAction: 5_000, HealthAlert: 5_000}
"""How far back (entries per stream) a restarted monitor reads to rebuild its windows."""
TICK_S = 5.0


def deployment_health() -> dict[str, Any]:
    """The deployment's `health:` section (HELOX_CONFIG), validated; {} without one."""
    path = os.environ.get("HELOX_CONFIG")
    value = (read_yaml(Path(path)).get("health") or {}) if path else {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: 'health' must be a mapping")
    try:
        HealthConfig.model_validate(value)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, f"{path} [health]").replace("\n  ", "\n  health.")) from exc
    return value


async def configure_run(rt: ServiceRuntime, monitor: HealthMonitor, deployment: dict[str, Any], run_id: str,
                        ref: ArtifactRef) -> None:
    """Judge `run_id` by its own config file; a file that cannot be used leaves the run on the
    deployment's thresholds, said loudly (the run is under way: watching it matters more)."""
    try:
        run_config = await asyncio.to_thread(read_run_config, rt.store, ref)
        config = run_health_config(deployment, run_config)
    except (RunConfigError, ValidationError) as exc:
        log.error("run config unusable: judging the run with the deployment's thresholds", run_id=run_id,
                  run_config=ref.uri, error=str(exc))
        return
    monitor.configure_run(run_id, config)


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
    deployment = deployment_health()
    monitor = HealthMonitor(HealthConfig.model_validate(deployment))
    rt.state["monitor"] = monitor

    async def on_event(env: Envelope[Any], _delivery: Delivery) -> None:
        await publish_alerts(rt, monitor.handle(env, received_at=time.time()), env)

    async def on_started(env: Envelope[TrainingStarted], delivery: Delivery) -> None:
        if env.run_id and env.payload.run_config is not None:
            await configure_run(rt, monitor, deployment, env.run_id, env.payload.run_config)
        await on_event(env, delivery)

    async def clock() -> None:
        while not rt.stopping.is_set():
            await asyncio.sleep(TICK_S)
            await publish_alerts(rt, monitor.tick(time.time()), None)

    async def rebuild(_rt: ServiceRuntime) -> None:
        history = await recent_history(rt)
        configs = {env.run_id: env.payload.run_config for env in sorted(history, key=lambda e: e.occurred_at)
                   if isinstance(env.payload, TrainingStarted) and env.run_id and env.payload.run_config is not None}
        for run_id, ref in configs.items():  # the latest reference of each run
            await configure_run(rt, monitor, deployment, run_id, ref)
        missed = monitor.replay(history)
        log.info("monitor rebuilt from history", events=len(history), unsent_alerts=len(missed))
        await publish_alerts(rt, missed, None)
        rt.state["clock"] = asyncio.create_task(clock(), name="health-clock")

    rt.on_startup(rebuild)
    rt.bus.subscribe(TrainingMetrics, on_event, max_records=100)
    rt.bus.subscribe(TrainingStarted, on_started)
    for payload in (TrainingCompleted, RunFailed, TrainerAction):
        rt.bus.subscribe(payload, on_event)
