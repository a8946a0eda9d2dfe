"""The loop's named events as contract events, through an Outbox.

One class for both launch paths: the trainer service's own process (one-process jobs) and
rank 0 of a job it launched with torchrun (services/trainer/job_worker.py).
"""

from __future__ import annotations

import math
import uuid
from typing import Any

from contracts import CheckpointSaved, TrainerAction, TrainingMetrics, TrainingStarted
from shared.artifacts import ArtifactStore
from shared.bus import Outbox
from shared.logging import get_logger

from .control import Action
from .hooks import Callback
from .loop import Trainer

log = get_logger("helox.trainer")

_REASONS = {"interval", "final", "signal", "command", "rollback-point"}


class BusEmitter(Callback):
    """Turns the loop's named events into contract events, through the outbox (never blocks).

    An observer: an event it cannot build is logged and counted (TrainingCompleted's
    `observer_failures`), not a failed run. `causation_id`/`correlation_id`: the DatasetReady
    the job answers (its correlation id, else its event id)."""

    observer = True

    def __init__(self, outbox: Outbox, store: ArtifactStore, run_id: str, meta: dict[str, Any], *,
                 causation_id: uuid.UUID, correlation_id: uuid.UUID) -> None:
        self.outbox, self.store, self.run_id, self.meta = outbox, store, run_id, meta
        self.causation_id, self.correlation_id = causation_id, correlation_id
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
