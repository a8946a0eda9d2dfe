"""One rank of a trainer job that the trainer service launched on N local processes.

    python -m torch.distributed.run --standalone --nproc_per_node N -m services.trainer.job_worker SPEC.json

The service writes SPEC.json (a `JobSpec`: the validated train config, the dataset manifest,
the run directory, the outbox settings, the inbox key) and waits for torchrun. Each rank
builds its part of the job with `job.build_trainer`, the factory every launch path uses.

- Rank 0 alone talks to the bus: its own `Outbox` and the service's `BusEmitter`
  (TrainingStarted, TrainingMetrics, CheckpointSaved, TrainerAction). It flushes them, then
  writes RESULT.json (`outcome`: finished with the TrainingResult, failed, or crashed); the
  service maps it onto TrainingCompleted / RunFailed / Requeue, as for a one-process job.
- The inbox: a Redis list (`JobSpec.inbox_key`). The service pushes what it receives for the
  run (HealthAlert, TrainerCommand, a stop for SIGTERM or a cancel) and rank 0 pops it into
  `Trainer.submit` / `request_stop`; the loop broadcasts rank 0's decisions to every rank.
  A list rather than a bus subscription inside rank 0: the service already holds the
  subscriptions (per-instance groups, cancellation), and a list keeps rank 0 free of an event
  loop. Redis is the one thing every node of a multi-node job shares.
- SIGTERM (torchrun forwards it to every rank): rank 0 checkpoints and stops; another rank
  relays the stop to rank 0 through the inbox, so the group stops at the same step.
- Rank 0 stops the job (checkpoint first) when the service process that launched it is gone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import redis
from pydantic import BaseModel

from contracts import ArtifactRef, Producer
from shared.artifacts import ArtifactStore
from shared.bus import Outbox
from shared.checkpoint import CheckpointError
from shared.data.dataset import DatasetError
from shared.data.manifest import ManifestError, ShardCorruptError
from shared.logging import configure_logging, get_logger

from .config import TrainConfig
from .control import Alert, Command
from .distributed import DistributedConfigError
from .loop import Trainer, TrainingError, TrainingResult

log = get_logger("helox.trainer.job")

RESULT_NAME = "result.json"
SIGTERM_REASON = "SIGTERM: checkpoint and hand the run back"
DETERMINISTIC_ERRORS = (TrainingError, CheckpointError, ShardCorruptError, DatasetError, ManifestError,
                        DistributedConfigError)
"""Errors a relaunch would meet again: the run fails. Anything else (a peer rank that died,
a broken connection) ends in a resume from the last checkpoint."""


class OutboxSpec(BaseModel):
    redis_url: str
    prefix: str
    producer: Producer
    spill_dir: str


class JobSpec(BaseModel):
    """What the service hands the ranks (JSON): everything `build_trainer` and rank 0's emitter need."""

    train: dict[str, Any]  # a validated TrainConfig, as JSON
    manifest_path: str
    out_dir: str
    run_id: str
    resume: str | None = None
    work_dir: str  # RESULT.json, the ranks' pid files
    artifacts: str  # the store's spec: a directory or s3://bucket/prefix (ArtifactStore.spec)
    state_dir: str | None = None  # the service's: an s3:// store's staging area and cache
    s3_endpoint_url: str | None = None  # credentials travel in the ranks' environment (HELOX_S3_*), not here
    s3_region: str | None = None
    outbox: OutboxSpec | None = None  # None: no bus (benchmarks); metrics only in the logs
    inbox_key: str | None = None
    causation_id: uuid.UUID | None = None
    correlation_id: uuid.UUID | None = None
    meta: dict[str, Any] = {}
    parent_pid: int | None = None
    log_format: str = "console"


# --- the inbox protocol (the service pushes, rank 0 pops) ---------------------------------


def inbox_message(item: Alert | Command | tuple[str, str]) -> str:
    """One inbox entry: an Alert, a Command, or a stop as (reason, kind)."""
    if isinstance(item, Alert):
        return json.dumps({"type": "alert", **dataclasses.asdict(item)})
    if isinstance(item, Command):
        return json.dumps({"type": "command", **dataclasses.asdict(item)})
    reason, kind = item
    return json.dumps({"type": "stop", "reason": reason, "kind": kind})


def apply_inbox_message(trainer: Trainer, raw: bytes | str) -> None:
    msg = json.loads(raw)
    kind = msg.pop("type")
    if kind == "alert":
        trainer.submit(Alert(**msg))
    elif kind == "command":
        trainer.submit(Command(**msg))
    elif kind == "stop":
        trainer.request_stop(msg["reason"], kind=msg["kind"])
    else:
        log.error("trainer.inbox_unknown", message=msg, type=kind)


# --- the result file --------------------------------------------------------------------


def result_to_json(result: TrainingResult) -> dict[str, Any]:
    out = dataclasses.asdict(result)
    for k in ("last_checkpoint", "best_checkpoint"):
        out[k] = None if out[k] is None else str(out[k])
    out["checkpoints"] = [str(p) for p in result.checkpoints]
    out["skipped_checkpoints"] = [str(p) for p in result.skipped_checkpoints]
    out["losses"] = {str(k): v for k, v in result.losses.items()}
    return out


def result_from_json(d: dict[str, Any]) -> TrainingResult:
    d = dict(d)
    for k in ("last_checkpoint", "best_checkpoint"):
        d[k] = None if d[k] is None else Path(d[k])
    d["checkpoints"] = [Path(p) for p in d["checkpoints"]]
    d["skipped_checkpoints"] = [Path(p) for p in d["skipped_checkpoints"]]
    d["losses"] = {int(k): v for k, v in d["losses"].items()}
    return TrainingResult(**d)


Outcome = Literal["finished", "failed", "crashed"]


def read_result(work_dir: Path) -> dict[str, Any] | None:
    """Rank 0's RESULT.json, or None when no rank 0 lived to write it."""
    path = work_dir / RESULT_NAME
    return json.loads(path.read_text()) if path.exists() else None


def _write_result(work_dir: Path, body: dict[str, Any]) -> None:
    tmp = work_dir / (RESULT_NAME + ".tmp")
    tmp.write_text(json.dumps(body))
    os.replace(tmp, work_dir / RESULT_NAME)


# --- the rank ---------------------------------------------------------------------------


class _Inbox:
    """Rank 0: a thread popping the inbox into the trainer. Other ranks: relays their SIGTERM."""

    def __init__(self, spec: JobSpec, rank: int) -> None:
        self.spec, self.rank = spec, rank
        self.client = redis.Redis.from_url(spec.outbox.redis_url) if spec.outbox and spec.inbox_key else None
        self.trainer: Trainer | None = None
        self.signalled = threading.Event()
        self.done = threading.Event()

    def start(self, trainer: Trainer) -> None:
        self.trainer = trainer
        threading.Thread(target=self._run, name="helox-job-inbox", daemon=True).start()

    def _run(self) -> None:
        assert self.trainer is not None
        while not self.done.is_set():
            if self.rank != 0:
                if not self.signalled.wait(1.0):
                    continue
                if self.client is None:  # no inbox (a bus-less run): nobody to relay to
                    log.warning("trainer.rank_sigterm_ignored", rank=self.rank, why="no inbox; rank 0 decides")
                    return
                try:
                    self.client.rpush(self.spec.inbox_key, inbox_message((SIGTERM_REASON, "signal")))
                except redis.RedisError as exc:
                    log.error("trainer.rank_sigterm_not_relayed", rank=self.rank, error=str(exc))
                    return
                log.info("trainer.rank_sigterm_relayed", rank=self.rank)
                return
            if self.spec.parent_pid is not None and not _alive(self.spec.parent_pid):
                self.trainer.request_stop("SIGTERM: the trainer service that launched the job is gone", kind="signal")
                return
            if self.client is None:
                self.done.wait(1.0)
                continue
            try:
                item = self.client.blpop([self.spec.inbox_key], timeout=1)
            except redis.RedisError as exc:  # Redis away: the job goes on, commands wait
                log.warning("trainer.inbox_unreachable", error=str(exc))
                self.done.wait(1.0)
                continue
            if item is not None:
                apply_inbox_message(self.trainer, item[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def job_store(spec: JobSpec) -> ArtifactStore:
    """The service's artifact store, built the way the service built it (ArtifactStore.from_settings):
    rank 0 publishes checkpoints where the service would, with s3:// references."""
    settings = SimpleNamespace(artifacts=spec.artifacts, state_dir=spec.state_dir or ".helox/state",
                               s3_endpoint_url=spec.s3_endpoint_url, s3_region=spec.s3_region)
    return ArtifactStore.from_settings(settings)


def run_rank(spec: JobSpec) -> int:
    """This rank's part of the job; rank 0 writes RESULT.json. Returns the exit status."""
    from .emitter import BusEmitter
    from .job import build_trainer

    rank = int(os.environ.get("RANK", "0"))
    work = Path(spec.work_dir)
    (work / f"rank-{rank}.pid").write_text(str(os.getpid()))
    inbox = _Inbox(spec, rank)
    trainer: Trainer | None = None

    def on_sigterm(_sig: int, _frame: Any) -> None:
        if rank == 0 and trainer is not None:
            trainer.request_stop(SIGTERM_REASON, kind="signal")
        inbox.signalled.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigterm)

    outbox = emitter = None
    if rank == 0 and spec.outbox is not None:
        o = spec.outbox
        outbox = Outbox(o.redis_url, producer=o.producer, prefix=o.prefix, spill_dir=o.spill_dir)
        meta = {**spec.meta, "run_config": ArtifactRef.model_validate(spec.meta["run_config"])
                if spec.meta.get("run_config") else None}
        assert spec.causation_id is not None and spec.correlation_id is not None
        emitter = BusEmitter(outbox, job_store(spec), spec.run_id, meta,
                             causation_id=spec.causation_id, correlation_id=spec.correlation_id)
    body: dict[str, Any]
    try:
        cfg = TrainConfig.model_validate(spec.train)
        trainer = build_trainer(cfg, Path(spec.manifest_path), Path(spec.out_dir), run_id=spec.run_id,
                                callbacks=[emitter] if emitter is not None else [])
        if inbox.signalled.is_set() and rank == 0:  # SIGTERM while the job was being built
            trainer.request_stop(SIGTERM_REASON, kind="signal")
        inbox.start(trainer)
        result = trainer.fit(spec.resume)
        body = {"outcome": "finished", "result": result_to_json(result),
                "observer_failures": dict(trainer.hooks.observer_failures), "world_size": trainer.ctx.world_size}
    except DETERMINISTIC_ERRORS as exc:
        log.error("trainer.job_failed", rank=rank, error=str(exc))
        body = {"outcome": "failed", "error_type": type(exc).__name__, "message": str(exc)}
    except Exception as exc:  # a peer died, a connection broke: resumable from the last checkpoint
        log.exception("trainer.job_crashed", rank=rank)
        body = {"outcome": "crashed", "error_type": type(exc).__name__, "message": str(exc)}
    finally:
        inbox.done.set()
    if rank == 0:
        if outbox is not None:
            outbox.close(30.0)  # TrainingStarted ... CheckpointSaved reach Redis before the final event
        _write_result(work, body)
    return 0 if body["outcome"] == "finished" else 1


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m services.trainer.job_worker SPEC.json (written by the trainer service)")
    spec = JobSpec.model_validate_json(Path(args[0]).read_text())
    rank = os.environ.get("RANK", "0")
    instance = spec.outbox.producer.instance if spec.outbox else "job"
    configure_logging("trainer", f"{instance}/rank{rank}", fmt=spec.log_format)
    code = run_rank(spec)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: gloo's threads can abort a finished process in C++ static
    # destructors, failing a run that succeeded (tests/trainer/worker.py does the same).
    os._exit(code)


if __name__ == "__main__":
    main()
