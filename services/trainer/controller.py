"""The trainer's control plane: alerts, commands and signals come in; actions are applied between steps.

    controller = Controller(trainer, policy)
    controller.submit(item)                 thread-safe: an Alert, a Command or a ready Action
    controller.request_checkpoint/stop()    only set a flag: safe inside a signal handler
    controller.apply()                      between steps: drain, decide (ControlPolicy), apply, announce
    controller.stop                         None while the run goes on, else (status, reason)

Under torchrun rank 0's inbox rules: it is broadcast, and every rank applies the same actions.
What the policy decides lives in control.py; this module only carries the decisions out.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from shared.checkpoint import latest_valid_checkpoint, remove_checkpoints_after
from shared.logging import get_logger

from .control import Action, ActionKind, Alert, Command, ControlError, ControlPolicy
from .data import BatchSource
from .hooks import Event

if TYPE_CHECKING:
    from .loop import Trainer

log = get_logger("helox.trainer")

Status = Literal["completed", "stopped", "halted"]
_HISTORY = 50_000  # steps of data-cursor history kept: alerts name recent windows


@dataclass
class Ledger:
    """Control decisions that survive rollbacks (and are saved in checkpoints for resumes)."""

    lr_scale: float = 1.0
    skip_ranges: list[list[int]] = field(default_factory=list)  # [start, end) global sample cursors

    def skip(self, data: BatchSource) -> None:
        """Move the data stream past the range to skip that its cursor is in, if any."""
        for start, end in self.skip_ranges:
            if start <= data.cursor < end:
                data.skip(end - data.cursor)


class Controller:
    """Applies control actions to one Trainer; holds the inbox, the pause and the stop decision."""

    def __init__(self, trainer: Trainer, policy: ControlPolicy) -> None:
        self.trainer, self.policy = trainer, policy
        self.ledger = Ledger()
        self.stop: tuple[Status, str] | None = None
        self.stop_checkpoint_reason = "command"
        self.paused = False
        self._inbox: queue.Queue[Alert | Command | Action] = queue.Queue()
        self._requested_checkpoint: tuple[str, str] | None = None  # set by signal handlers: no locks
        self._requested_stop: tuple[str, str] | None = None
        self._windows: dict[int, tuple[int, int]] = {}  # step -> global sample cursors [start, end)
        self._pre_rollback_cursor: int | None = None

    # --- thread-safe entry points -------------------------------------------------------------

    def submit(self, item: Alert | Command | Action) -> None:
        if not isinstance(item, (Alert, Command, Action)):
            raise ControlError(f"submit takes an Alert, a Command or an Action, not {type(item).__name__}")
        self._inbox.put(item)

    def request_checkpoint(self, reason: str = "signal", *, kind: str = "signal") -> None:
        self._requested_checkpoint = (reason, kind)

    def request_stop(self, reason: str = "signal", *, kind: str = "signal") -> None:
        self._requested_stop = (reason, kind)

    # --- between steps ------------------------------------------------------------------------

    def note_window(self, step: int, start: int, end: int) -> None:
        """The data a step consumed: a skip_data action names steps, the ledger needs cursors."""
        self._windows[step] = (start, end)
        if len(self._windows) > 2 * _HISTORY:
            self._windows = {s: c for s, c in self._windows.items() if s > step - _HISTORY}

    def apply(self) -> None:
        """Apply what arrived; while paused, keep applying (a resume, a stop) until unpaused."""
        while True:
            for item in self._drain():
                for action in self._decide(item):
                    self._apply(action)
                    if self.stop is not None:
                        return
            if not self.paused:
                return
            time.sleep(0.2)

    def announce(self, action: Action, **details: Any) -> None:
        """Log the action with its reason and fire the `action` event (rank 0): the audit trail."""
        if details:
            action = Action(action.kind, action.reason, {**action.params, **details}, action.alert_event_id,
                            action.command_event_id)
        t = self.trainer
        log.info("trainer.action", action=action.kind.value, why=action.reason, step=t.state.step,
                 details=action.params)
        if t.ctx.is_main:
            t.hooks.fire(Event.ACTION, t, action=action)

    def _drain(self) -> list[Alert | Command | Action]:
        items: list[Alert | Command | Action] = []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        if (req := self._requested_checkpoint) is not None:
            self._requested_checkpoint = None
            items.append(Action(ActionKind.CHECKPOINT, req[0], {"checkpoint_reason": req[1]}))
        if (req := self._requested_stop) is not None:
            self._requested_stop = None
            items.append(Action(ActionKind.STOP, req[0], {"checkpoint_reason": req[1]}))
        ctx = self.trainer.ctx
        if ctx.active:
            items = ctx.broadcast_objects(items)  # rank 0 decides for everyone
        return items

    def _decide(self, item: Alert | Command | Action) -> list[Action]:
        if isinstance(item, Action):
            return [item]
        try:
            return self.policy.decide(item, self.trainer.state.step)
        except ControlError as exc:  # a malformed command must not end the run: refuse it, on record
            log.error("trainer.control_refused", item=repr(item), error=str(exc))
            return [Action(ActionKind.RECORD, f"refused: {exc}", {},
                           item.event_id if isinstance(item, Alert) else None,
                           item.event_id if isinstance(item, Command) else None)]

    def _apply(self, action: Action) -> None:
        t, k = self.trainer, action.kind
        if k is ActionKind.ROLLBACK:
            self._rollback(action)
        elif k is ActionKind.SKIP_DATA:
            self._skip_data(action)
        elif k is ActionKind.SCALE_LR:
            self.ledger.lr_scale *= float(action.params["factor"])
            self.announce(action, lr_scale=self.ledger.lr_scale)
        elif k is ActionKind.PAUSE:
            self.paused = True
            t.throughput.pause()
            self.announce(action)
        elif k is ActionKind.RESUME:
            if self.paused:
                t.throughput.resume()
            self.paused = False
            self.announce(action)
        elif k is ActionKind.CHECKPOINT:
            t.checkpointer.save(t.state.step, action.params.get("checkpoint_reason", "command"))
            self.announce(action)
        elif k is ActionKind.STOP:
            self.stop = ("stopped", action.reason)
            self.stop_checkpoint_reason = action.params.get("checkpoint_reason", "command")
            self.announce(action)
        elif k is ActionKind.HALT:
            self.stop = ("halted", action.reason)
            self.announce(action)
        else:
            self.announce(action)

    def _rollback(self, action: Action) -> None:
        t = self.trainer
        before = action.params.get("before_step")
        t.settle_checkpoints()  # the newest write may be the one to return to
        root = t.checkpointer.root
        path = latest_valid_checkpoint(root, before_step=before) if t.ctx.is_main else None
        path = t.ctx.broadcast_objects([path])[0]
        if path is None:
            where = f" before step {before}" if before is not None else ""
            self.stop = ("halted", f"{action.reason}; no valid checkpoint{where} to roll back to")
            self.announce(Action(ActionKind.HALT, self.stop[1], {}, action.alert_event_id, action.command_event_id))
            return
        from_step, self._pre_rollback_cursor = t.state.step, t.data.cursor
        t.rewind(t.checkpointer.load(path))
        if t.ctx.is_main:
            remove_checkpoints_after(root, t.state.step)  # the abandoned timeline
        self.announce(action, from_step=from_step, restored_step=t.state.step, checkpoint=str(path))

    def _skip_data(self, action: Action) -> None:
        p, data = action.params, self.trainer.data
        if "samples" in p:  # ahead of the current position
            start, end = data.cursor, data.cursor + int(p["samples"])
        else:
            window = [self._windows[s] for s in range(int(p["step_start"]), int(p["step_end"]) + 1)
                      if s in self._windows]
            if window:
                start, end = min(w[0] for w in window), max(w[1] for w in window)
            else:  # steps not seen by this process (resumed since): skip what the rollback rewound
                start, end = data.cursor, self._pre_rollback_cursor or data.cursor
        if end > start:
            self.ledger.skip_ranges.append([start, end])
        self.announce(action, cursor_start=start, cursor_end=end)

    # --- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"lr_scale": self.ledger.lr_scale, "skip_ranges": self.ledger.skip_ranges,
                "policy": self.policy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # In place: the LR policy reads the ledger it was given.
        self.ledger.lr_scale = float(state.get("lr_scale", 1.0))
        self.ledger.skip_ranges = [list(r) for r in state.get("skip_ranges", [])]
        self.policy.load_state_dict(state.get("policy", {}))
