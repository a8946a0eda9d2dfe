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
- `train.distributed.nproc > 1`: the job runs on N local processes (torchrun, `job_worker`);
  rank 0 emits the job's events through its own outbox, alerts/commands/stops reach it through
  a Redis list, and the service maps rank 0's result file onto the same outcomes; a rank that
  died ends in a Requeue and a resume from the last checkpoint (docs/distributed.md).
- The run's config comes from the `run_config` reference DatasetReady carries (verified by
  digest); TrainingStarted, CheckpointSaved and TrainingCompleted carry it on to the health
  monitor, the evaluator and the exporter.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import redis
from pydantic import ValidationError

from contracts import (
    DatasetReady,
    Envelope,
    HealthAlert,
    RunCancelled,
    RunFailed,
    TrainerCommand,
    TrainingCompleted,
)
from shared.artifacts import ArtifactDigestError
from shared.bus import Delivery, Outbox, Requeue
from shared.cancellation import honour_cancellations, is_cancelled
from shared.checkpoint import CheckpointError
from shared.data.dataset import DatasetError
from shared.data.manifest import ManifestError, ShardCorruptError
from shared.logging import get_logger
from shared.runs import RunConfigError, read_run_config, section, stages
from shared.service import ServiceRuntime

from .config import TrainConfig
from .control import Alert, Command
from .emitter import BusEmitter
from .job import build_trainer, train_config
from .job_worker import JobSpec, OutboxSpec, inbox_message, read_result, result_from_json
from .loop import TrainingError, TrainingResult

log = get_logger("helox.trainer")


class JobControl(Protocol):
    """What the service does to a running job: a Trainer in this process, or rank 0 of a launched one."""

    def submit(self, item: Alert | Command) -> None: ...

    def request_stop(self, reason: str = "signal", *, kind: str = "signal") -> None: ...


@dataclass
class Job:
    run_id: str
    trainer: JobControl


class LaunchedJob:
    """A job on N local processes (torchrun): alerts, commands and stops go to rank 0's inbox list."""

    def __init__(self, client: Any, key: str) -> None:
        self.client, self.key = client, key

    def _push(self, message: str) -> None:
        # Called from the event loop (handlers) and from the stop hook: a plain redis-py call, short.
        self.client.rpush(self.key, message)

    def submit(self, item: Alert | Command) -> None:
        self._push(inbox_message(item))

    def request_stop(self, reason: str = "signal", *, kind: str = "signal") -> None:
        try:
            self._push(inbox_message((reason, kind)))
        except redis.RedisError as exc:  # the service still stops: its grace period then kills the group
            log.error("could not ask the launched job to stop", error=str(exc), reason=reason)


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
        emitter = BusEmitter(self.outbox, rt.store, run_id, meta, causation_id=env.event_id,
                             correlation_id=env.correlation_id or env.event_id)
        if cfg.distributed.nproc > 1:
            await self._launch(env, delivery, cfg, manifest_path, out_dir, resume, emitter)
            return
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

    async def _launch(self, env: Envelope[DatasetReady], delivery: Delivery, cfg: TrainConfig, manifest_path: Path,
                      out_dir: Path, resume: str | None, emitter: BusEmitter) -> None:
        """The job on `train.distributed.nproc` local processes (torchrun); rank 0 emits its events.

        The outcome comes from rank 0's result file, not torchrun's exit status (torchrun exits
        non-zero after forwarding a signal even when the ranks stopped cleanly): finished -> as a
        one-process job (TrainingCompleted, Requeue after SIGTERM, cancelled, halted); failed (an
        error a relaunch would meet again) -> RunFailed; a rank that died or no result at all ->
        Requeue, so that a redelivery resumes from the last checkpoint, until max_deliveries.
        """
        rt, s, run_id = self.rt, self.rt.settings, env.run_id or ""
        assert s.redis_url
        launch_id = uuid.uuid4().hex[:8]
        work = Path(s.state_dir) / "jobs" / f"{run_id}-{launch_id}"
        work.mkdir(parents=True, exist_ok=True)
        inbox_key = f"{rt.bus.prefix}trainer:inbox:{run_id}:{launch_id}"
        run_config = emitter.meta["run_config"]
        spec = JobSpec(
            train=cfg.model_dump(mode="json"), manifest_path=str(manifest_path), out_dir=str(out_dir), run_id=run_id,
            resume=resume, work_dir=str(work), artifacts=rt.store.spec, state_dir=str(s.state_dir),
            s3_endpoint_url=s.s3_endpoint_url, s3_region=s.s3_region,
            outbox=OutboxSpec(redis_url=s.redis_url, prefix=rt.bus.prefix, producer=rt.bus.producer,
                              spill_dir=str(Path(s.state_dir) / "outbox" / f"{rt.instance}-job")),
            inbox_key=inbox_key, causation_id=emitter.causation_id, correlation_id=emitter.correlation_id,
            meta={**emitter.meta, "run_config": run_config.model_dump(mode="json") if run_config else None},
            parent_pid=os.getpid(), log_format=s.log_format,
        )
        spec_path = work / "spec.json"
        spec_path.write_text(spec.model_dump_json())
        client = redis.Redis.from_url(s.redis_url, socket_timeout=2.0)
        control = LaunchedJob(client, inbox_key)
        with open(work / "torchrun.log", "ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *launch_command(cfg.distributed.nproc, spec_path), stdout=out, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True, env=_child_env(s))  # its own group: the service signals it deliberately
        log.info("training job launched", run_id=run_id, nproc=cfg.distributed.nproc, pid=proc.pid, work_dir=str(work))
        self.job = Job(run_id, control)
        rt.current_work = f"training {run_id} on {cfg.distributed.nproc} ranks"
        if rt.stopping.is_set():
            control.request_stop("SIGTERM: stopping before start", kind="signal")
        elif await is_cancelled(rt, run_id):
            self.cancelled[run_id] = "cancelled by an operator"
            control.request_stop("cancelled before the first step", kind="command")
        try:
            rc = await self._wait_group(proc)
        finally:
            self.job = None
            rt.current_work = None
            await asyncio.to_thread(_quietly, client.delete, inbox_key)
            client.close()
        body = read_result(work)
        log.info("training job exited", run_id=run_id, returncode=rc, outcome=body and body["outcome"])
        if body is None or body["outcome"] == "crashed":
            what = (f"{body['error_type']}: {body['message']}" if body
                    else f"torchrun exited with {rc} before rank 0 wrote a result (a rank died)")
            if run_id in self.cancelled or delivery.delivery_count >= s.max_deliveries:
                why = self.cancelled.pop(run_id, None)
                await self._fail(env, f"cancelled: {why}" if why else f"training failed on a rank: {what}",
                                 "Cancelled" if why else "RankFailure")
                await rt.idempotency.commit(f"run:{run_id}", "cancelled" if why else "failed")
                return
            raise Requeue(f"run {run_id}: {what}; a redelivery resumes from the last checkpoint")
        if body["outcome"] == "failed":
            await self._fail(env, f"training failed: {body['message']}", body["error_type"])
            await rt.idempotency.commit(f"run:{run_id}", "failed")
            return
        await self._finish(env, result_from_json(body["result"]), emitter, delivery, body["observer_failures"])

    async def _wait_group(self, proc: asyncio.subprocess.Process) -> int:
        """torchrun's exit status. Once the service stops, the job has STOP_GRACE_S to checkpoint and
        exit; then its process group is killed (and a cancelled handler kills it at once)."""
        stop_seen: float | None = None
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    return await asyncio.wait_for(proc.wait(), 1.0)
                except TimeoutError:
                    pass
                if self.rt.stopping.is_set():
                    stop_seen = stop_seen or loop.time()
                    if loop.time() - stop_seen > STOP_GRACE_S:
                        log.error("training job did not stop in time; killing its process group", pid=proc.pid)
                        _kill_group(proc.pid)
        except asyncio.CancelledError:
            _kill_group(proc.pid)
            raise

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


STOP_GRACE_S = 120.0
"""How long a launched job may take to checkpoint and exit once the service stops."""


def launch_command(nproc: int, spec_path: Path) -> list[str]:
    """torchrun on this machine: a standalone rendezvous, no restarts (the service resumes a
    failed group from its last checkpoint), a dead rank noticed within half a second."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=0", "--monitor-interval=0.5", "-m", "services.trainer.job_worker", str(spec_path)]


def _child_env(settings: Any = None) -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])  # the ranks import services.* whatever the cwd
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}
    # An s3:// store's credentials, wherever the service's settings got them (env or config file):
    # in the ranks' environment, never in the spec file.
    for name in ("s3_access_key_id", "s3_secret_access_key"):
        value = getattr(settings, name, None)
        if value is not None:
            env[f"HELOX_{name.upper()}"] = value.get_secret_value() if hasattr(value, "get_secret_value") else value
    return env


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _quietly(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except redis.RedisError as exc:
        log.warning("could not delete a job's inbox", error=str(exc))


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

