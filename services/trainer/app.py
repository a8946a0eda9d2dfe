"""trainer wiring: DatasetReady -> a training job (in a worker thread) -> events through the outbox.

- One job at a time per instance (the DatasetReady subscription reads one entry at a time;
  the bus keeps its claim alive while the job runs).
- Every event the job emits (TrainingStarted, TrainingMetrics, CheckpointSaved, TrainerAction,
  TrainingCompleted, RunFailed) goes through one Outbox, in order, never blocking the loop.
- HealthAlert and TrainerCommand arrive in a per-instance consumer group (each instance sees
  every alert and acts on those of the run it is training) and are submitted to the running
  Trainer, which applies them between steps.
- SIGTERM: the job checkpoints and stops, and its DatasetReady entry is handed back
  (Requeue); the restarted instance, or another one, resumes from the last checkpoint.
- A finished run is marked done (idempotency by run id), so a redelivery does not train again.
- The run's config comes from the `run_config` reference DatasetReady carries (verified by
  digest); TrainingStarted, CheckpointSaved and TrainingCompleted carry it on to the health
  monitor, the evaluator and the exporter.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from contracts import (
    CheckpointSaved,
    DatasetReady,
    Envelope,
    HealthAlert,
    RunCancelled,
    RunFailed,
    TrainerAction,
    TrainerCommand,
    TrainingCompleted,
    TrainingMetrics,
    TrainingStarted,
)
from shared.artifacts import ArtifactDigestError, ArtifactStore
from shared.bus import Delivery, Outbox, Requeue
from shared.cancellation import honour_cancellations, is_cancelled
from shared.checkpoint import CheckpointError
from shared.data.dataset import DatasetError
from shared.data.manifest import ManifestError, ShardCorruptError
from shared.logging import get_logger
from shared.runs import RunConfigError, read_run_config, section, stages
from shared.service import ServiceRuntime

from .control import Action, Alert, Command
from .hooks import Callback
from .job import build_trainer, train_config
from .loop import Trainer, TrainingError, TrainingResult

log = get_logger("helox.trainer")


class BusEmitter(Callback):
    """Turns the loop's named events into contract events, through the outbox (never blocks).

    An observer: an event it cannot build is logged and counted (TrainingCompleted's
    `observer_failures`), not a failed run."""

    observer = True

    def __init__(self, outbox: Outbox, store: ArtifactStore, run_id: str, cause: Envelope[Any], meta: dict[str, Any]):
        self.outbox, self.store, self.run_id, self.meta = outbox, store, run_id, meta
        self.causation_id = cause.event_id
        self.correlation_id = cause.correlation_id or cause.event_id
        self.last_checkpoint: CheckpointSaved | None = None

    def _emit(self, payload: Any) -> None:
        self.outbox.publish(payload, run_id=self.run_id, causation_id=self.causation_id,
                            correlation_id=self.correlation_id)

    def on_train_start(self, trainer: Trainer, resumed_from: int | None) -> None:
        self._emit(TrainingStarted(
            dataset_version=self.meta["dataset_version"], model_preset=self.meta["preset"],
            n_params=sum(p.numel() for p in trainer.raw_model.parameters()), total_steps=trainer.config.max_steps,
            world_size=trainer.ctx.world_size, device=str(trainer.device), precision=trainer.precision.mode,
            resumed_from_step=resumed_from, instance=self.meta["instance"], run_config=self.meta["run_config"],
        ))

    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        fields = {k: v for k, v in metrics.items() if k in TrainingMetrics.model_fields and v is not None}
        fields.setdefault("tokens_seen", trainer.state.tokens)
        fields["data_cursor"] = trainer.data.cursor
        self._emit(TrainingMetrics.model_validate(fields))

    def on_checkpoint(self, trainer: Trainer, info: Any, reason: str) -> None:
        # Fired once the files are durable (the background writer finished and fsynced).
        train_loss = info.meta.get("train_loss")
        try:
            ref = self.store.ref(info.manifest)
        except FileNotFoundError:
            # Already pruned (keep_last) by a later write before the loop polled this one:
            # nothing left to announce or evaluate.
            log.info("checkpoint pruned before it was announced", step=info.step)
            return
        event = CheckpointSaved(
            step=info.step, tokens_seen=int(info.meta.get("tokens", 0)), checkpoint=ref,
            digest=info.digest, dataset_version=self.meta["dataset_version"],
            train_loss=train_loss if train_loss is None or math.isfinite(train_loss) else None,
            val_loss=info.meta.get("val_loss"), reason=reason if reason in _REASONS else "interval",
            # The last step's checkpoint is the final one even when an interval wrote it.
            is_final=reason == "final" or info.step >= trainer.config.max_steps,
            run_config=self.meta["run_config"],
        )
        self.last_checkpoint = event
        self._emit(event)

    def on_action(self, trainer: Trainer, action: Action) -> None:
        details = {k: v for k, v in action.params.items() if isinstance(v, (int, float, str, bool)) or v is None}
        self._emit(TrainerAction(
            action=action.kind.value, reason=action.reason, step=trainer.state.step,
            alert_event_id=action.alert_event_id, command_event_id=action.command_event_id, details=details,
        ))


_REASONS = {"interval", "final", "signal", "command", "rollback-point"}


@dataclass
class Job:
    run_id: str
    trainer: Trainer


class TrainerService:
    def __init__(self, rt: ServiceRuntime) -> None:
        self.rt = rt
        self.outbox: Outbox | None = None
        self.job: Job | None = None
        self.cancelled: dict[str, str] = {}
        """Runs cancelled while this instance trained them: run id -> reason."""

    async def start(self, _rt: ServiceRuntime) -> None:
        s = self.rt.settings
        assert s.redis_url
        self.outbox = Outbox(s.redis_url, producer=self.rt.bus.producer, prefix=self.rt.bus.prefix,
                             spill_dir=Path(s.state_dir) / "outbox" / self.rt.instance)

    async def stop(self, _rt: ServiceRuntime) -> None:
        if self.outbox:
            await asyncio.to_thread(self.outbox.close, 10.0)

    def request_stop(self) -> None:
        if self.job:
            self.job.trainer.request_stop("SIGTERM: checkpoint and hand the run back", kind="signal")

    # --- the job ------------------------------------------------------------------------

    async def on_dataset_ready(self, env: Envelope[DatasetReady], delivery: Delivery) -> None:
        rt, ev = self.rt, env.payload
        run_id = env.run_id
        if not run_id:
            return
        if self.job is not None:  # one job at a time per instance: leave it for another
            raise Requeue(f"busy with run {self.job.run_id}")
        if ev.run_config is None:
            await self._fail(env, f"DatasetReady of run {run_id} carries no run_config reference: cannot train "
                             "without the run's configuration (data-prep writes runs/<run_id>/config.json)",
                             "RunConfigError")
            return
        try:
            run_config = await asyncio.to_thread(read_run_config, rt.store, ev.run_config)
            wanted = stages(run_config)
        except RunConfigError as exc:
            await self._fail(env, f"cannot train: {exc}", type(exc).__name__)
            return
        if "train" not in wanted:
            return
        if await rt.idempotency.seen(f"run:{run_id}"):
            log.info("run already trained; skipping redelivery", run_id=run_id)
            return
        if await is_cancelled(rt, run_id):
            log.info("run cancelled before training; skipped", run_id=run_id)
            return
        try:
            cfg = train_config(section(run_config, "train"), vocab_size=ev.vocab_size,
                               dataset_version=ev.dataset_version)
            manifest_path = rt.store.open_verified(ev.manifest)
        except RunConfigError as exc:
            await self._fail(env, f"invalid train config: {exc}", type(exc).__name__)
            return
        except ValidationError as exc:
            await self._fail(env, f"invalid train config: {exc}", "ValidationError")
            return
        except (ArtifactDigestError, FileNotFoundError, ValueError) as exc:
            await self._fail(env, f"dataset {ev.dataset_version} unusable: {exc}", type(exc).__name__)
            return

        out_dir = rt.store.path("runs", run_id)
        resume = "latest" if any((out_dir / cfg.checkpoint.dirname).glob("step-*")) else None
        meta = {"dataset_version": ev.dataset_version, "instance": rt.instance,
                "preset": cfg.model if isinstance(cfg.model, str) else "custom", "run_config": ev.run_config}
        assert self.outbox is not None
        emitter = BusEmitter(self.outbox, rt.store, run_id, env, meta)
        try:
            trainer = await asyncio.to_thread(build_trainer, cfg, manifest_path, out_dir, run_id=run_id,
                                              callbacks=[emitter])
        except (ManifestError, ShardCorruptError, DatasetError, TrainingError, CheckpointError) as exc:
            await self._fail(env, f"cannot start training: {exc}", type(exc).__name__)
            await rt.idempotency.commit(f"run:{run_id}", "failed")
            return
        except Exception as exc:
            if delivery.delivery_count < rt.settings.max_deliveries:
                raise  # maybe transient: the entry stays pending and is redelivered
            await self._fail(env, f"cannot start training: {exc!r}", type(exc).__name__)
            await rt.idempotency.commit(f"run:{run_id}", "failed")
            return
        self.job = Job(run_id, trainer)
        rt.current_work = f"training {run_id}"
        if rt.stopping.is_set():
            trainer.request_stop("stopping before start", kind="signal")
        elif await is_cancelled(rt, run_id):  # cancelled while the job was being built
            self.cancelled[run_id] = "cancelled by an operator"
            trainer.request_stop("cancelled before the first step", kind="command")
        try:
            result: TrainingResult = await asyncio.to_thread(trainer.fit, resume)
        except (CheckpointError, TrainingError, ShardCorruptError) as exc:
            await self._fail(env, f"training failed: {exc}", type(exc).__name__)
            await rt.idempotency.commit(f"run:{run_id}", "failed")
            return
        except Exception as exc:
            # Anything else escaping the job (an I/O error in a background checkpoint write, an
            # out-of-memory error, a bug in a callback) ends the run too, saying what it was: a
            # redelivery would fail the same way after a long wait, then only dead-letter.
            log.exception("training job crashed", run_id=run_id)
            await self._fail(env, f"training failed: {type(exc).__name__}: {exc}", type(exc).__name__)
            await rt.idempotency.commit(f"run:{run_id}", "failed")
            return
        finally:
            self.job = None
            rt.current_work = None
        await self._finish(env, result, emitter, delivery, dict(trainer.hooks.observer_failures))

    async def _finish(self, env: Envelope[DatasetReady], result: TrainingResult, emitter: BusEmitter,
                      delivery: Delivery, observer_failures: dict[str, int]) -> None:
        rt, run_id = self.rt, env.run_id or ""
        assert self.outbox is not None
        if run_id in self.cancelled:
            why = self.cancelled.pop(run_id)
            emitter._emit(RunFailed(stage="train", reason=f"cancelled at step {result.final_step} (checkpointed): "
                                    f"{why}", error_type="Cancelled"))
            await asyncio.to_thread(self.outbox.flush, 60.0)
            await rt.idempotency.commit(f"run:{run_id}", "cancelled")
            log.info("training cancelled", run_id=run_id, step=result.final_step)
            return
        if result.status == "stopped" and result.reason.startswith("SIGTERM"):
            await asyncio.to_thread(self.outbox.flush, 30.0)
            raise Requeue(f"run {run_id} stopped at step {result.final_step} for shutdown; resumable")
        if result.status == "completed" or result.status == "stopped":
            if result.last_checkpoint is None or result.last_checkpoint_digest is None:
                await self._fail(env, "training ended without a checkpoint", "TrainingError")
                return
            best = result.best_checkpoint
            done = TrainingCompleted(
                final_step=result.final_step, tokens_seen=result.tokens,
                final_loss=result.final_loss if result.final_loss is not None else float("nan"),
                best_val_loss=result.best_val_loss,
                final_checkpoint=rt.store.ref(result.last_checkpoint / "manifest.json"),
                final_checkpoint_digest=result.last_checkpoint_digest,
                best_checkpoint=rt.store.ref(best / "manifest.json") if best and best.exists() else None,
                wall_time_s=result.wall_time_s, rollbacks=result.rollbacks, skipped_steps=result.skipped_steps,
                run_config=emitter.meta["run_config"], observer_failures=observer_failures,
            )
            emitter._emit(done)
        else:  # halted by the policy
            emitter._emit(RunFailed(stage="train", reason=result.reason or "halted", error_type="Halted"))
        if not await asyncio.to_thread(self.outbox.flush, 60.0):
            raise RuntimeError("events could not be delivered to Redis; the run's entry stays pending")
        await rt.idempotency.commit(f"run:{run_id}", result.status)
        log.info("training finished", run_id=run_id, status=result.status, steps=result.final_step,
                 loss=result.final_loss, rollbacks=result.rollbacks)

    async def _fail(self, env: Envelope[Any], reason: str, error_type: str) -> None:
        log.error("training run failed", run_id=env.run_id, reason=reason)
        await self.rt.bus.publish(RunFailed(stage="train", reason=reason[:2000], error_type=error_type))

    # --- control ------------------------------------------------------------------------

    async def on_alert(self, env: Envelope[HealthAlert], _delivery: Delivery) -> None:
        job, a = self.job, env.payload
        if job is None or env.run_id != job.run_id:
            return
        job.trainer.submit(Alert(kind=a.kind, severity=a.severity, step_start=a.step_start, step_end=a.step_end,
                                 recommended_action=a.recommended_action, message=a.message, state=a.state,
                                 event_id=str(env.event_id), incident_id=a.incident_id))

    async def on_cancel(self, run_id: str, event: RunCancelled) -> None:
        job = self.job
        if job is None or job.run_id != run_id:
            return
        self.cancelled[run_id] = event.reason or "cancelled by an operator"
        job.trainer.request_stop(f"cancelled: {self.cancelled[run_id]}", kind="command")

    async def on_command(self, env: Envelope[TrainerCommand], _delivery: Delivery) -> None:
        job, c = self.job, env.payload
        if job is None or env.run_id != job.run_id:
            return
        job.trainer.submit(Command(command=c.command, value=c.value, reason=c.reason, event_id=str(env.event_id)))


def setup(rt: ServiceRuntime) -> None:
    svc = TrainerService(rt)
    rt.state["trainer"] = svc
    rt.on_startup(svc.start)
    rt.on_shutdown(svc.stop)
    rt.on_stop_requested(lambda _rt: svc.request_stop())  # the job checkpoints and stops first
    control_group = f"trainer-control-{rt.instance}"
    rt.bus.subscribe(DatasetReady, svc.on_dataset_ready)
    rt.bus.subscribe(HealthAlert, svc.on_alert, group=control_group)
    rt.bus.subscribe(TrainerCommand, svc.on_command, group=control_group)
    honour_cancellations(rt, svc.on_cancel, group=control_group)  # every instance hears it

