"""The control policy: incoming alerts and commands -> actions the loop applies between steps.

Pure: no torch, no I/O. The loop feeds `ControlPolicy.decide` with what arrived through
`Trainer.submit` and applies the returned actions in order.

Default policy (kinds as in contracts.events.AlertKind):
    non_finite, grad_explosion  -> rollback + skip the data window + LR x lr_cut
    divergence, loss_scale_collapse -> rollback + LR x lr_cut
    loss_spike                  -> record, unless spike_repeat spikes within spike_window_steps:
                                   then as divergence
    stagnation and the rest     -> record (a notification for humans)
    more than max_rollbacks rollbacks -> halt
A kind without a rule follows the alert's recommended action. `ControlConfig.rules`
overrides any kind.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .config import ControlConfig


class ActionKind(StrEnum):
    ROLLBACK = "rollback"  # restore the last good checkpoint (params: before_step)
    SKIP_DATA = "skip_data"  # params: step_start/step_end (a past window) or samples (ahead)
    SCALE_LR = "scale_lr"  # params: factor
    PAUSE = "pause"
    RESUME = "resume"
    CHECKPOINT = "checkpoint"
    STOP = "stop"  # checkpoint, then stop
    HALT = "halt"  # stop without a checkpoint: the run is failing
    RECORD = "record"  # nothing to do but leave a trace


class ControlError(ValueError):
    """An alert, command or rule the policy cannot act on."""


@dataclass(frozen=True)
class Alert:
    """A health alert (the fields of contracts' HealthAlert the policy needs)."""

    kind: str
    severity: str = "warning"
    step_start: int | None = None
    step_end: int | None = None
    recommended_action: str | None = None
    message: str = ""
    state: str = "firing"
    event_id: str | None = None
    incident_id: str | None = None


@dataclass(frozen=True)
class Command:
    """An operator command (contracts' TrainerCommand)."""

    command: str
    value: float | None = None
    reason: str = ""
    event_id: str | None = None


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    reason: str
    params: dict[str, Any] = field(default_factory=dict)
    alert_event_id: str | None = None
    command_event_id: str | None = None


_RULE_NAMES = {"rollback", "skip_data", "scale_lr", "record", "notify", "halt", "checkpoint", "pause", "stop"}

DEFAULT_RULES: dict[str, list[str]] = {
    "non_finite": ["rollback", "skip_data", "scale_lr"],
    "grad_explosion": ["rollback", "skip_data", "scale_lr"],
    "divergence": ["rollback", "scale_lr"],
    "loss_scale_collapse": ["rollback", "scale_lr"],
    "loss_spike": ["record"],
    "stagnation": ["notify"],
}

RECOMMENDED: dict[str, list[str]] = {
    "rollback": ["rollback", "skip_data"],
    "rollback_cut_lr": ["rollback", "skip_data", "scale_lr"],
    "cut_lr": ["scale_lr"],
    "skip_data": ["rollback", "skip_data"],
    "record": ["record"],
    "notify": ["notify"],
    "halt": ["halt"],
}

_COMMANDS = {
    "pause": ActionKind.PAUSE,
    "resume": ActionKind.RESUME,
    "checkpoint": ActionKind.CHECKPOINT,
    "stop": ActionKind.STOP,
    "rollback": ActionKind.ROLLBACK,
    "scale_lr": ActionKind.SCALE_LR,
    "skip_data": ActionKind.SKIP_DATA,
}


class ControlPolicy:
    """Decides actions; remembers rollbacks and recent spikes (state saved with checkpoints)."""

    def __init__(self, cfg: ControlConfig | None = None) -> None:
        self.cfg = cfg or ControlConfig()
        self.rules = {**DEFAULT_RULES, **self.cfg.rules}
        for kind, names in self.rules.items():
            bad = set(names) - _RULE_NAMES
            if bad:
                raise ControlError(f"rule for {kind!r} names unknown actions {sorted(bad)}; use {sorted(_RULE_NAMES)}")
        self.rollbacks = 0
        self.spikes: deque[int] = deque()
        self.handled: tuple[int, int] | None = None
        """Steps [start, end] of the last incident answered by a rollback: a further alert whose
        window overlaps it describes the same incident (another detector, a late arrival, in
        either order) and is only recorded, so one incident costs one rollback, one LR cut and
        one skip. The window grows to cover what the duplicates name."""

    def decide(self, item: Alert | Command, step: int) -> list[Action]:
        if isinstance(item, Command):
            return [self._command(item)]
        if isinstance(item, Alert):
            return self._alert(item, step)
        raise ControlError(f"cannot decide on {type(item).__name__}; submit an Alert, a Command or an Action")

    # --- commands -----------------------------------------------------------------------

    def _command(self, c: Command) -> Action:
        kind = _COMMANDS.get(c.command)
        if kind is None:
            raise ControlError(f"unknown command {c.command!r}; expected one of {sorted(_COMMANDS)}")
        params: dict[str, Any] = {}
        if kind is ActionKind.SCALE_LR:
            if c.value is None or c.value <= 0:
                raise ControlError("scale_lr needs a positive value (the LR factor), e.g. 0.5")
            params["factor"] = float(c.value)
        elif kind is ActionKind.SKIP_DATA:
            if c.value is None or c.value < 1:
                raise ControlError("skip_data needs a value: the number of samples to skip ahead")
            params["samples"] = int(c.value)
        elif kind is ActionKind.ROLLBACK:
            params["before_step"] = None
        reason = f"command {c.command}" + (f": {c.reason}" if c.reason else "")
        return Action(kind, reason, params, command_event_id=c.event_id)

    # --- alerts -------------------------------------------------------------------------

    def _alert(self, a: Alert, step: int) -> list[Action]:
        start = a.step_start if a.step_start is not None else step
        end = a.step_end if a.step_end is not None else step
        what = f"{a.severity} {a.kind} alert (steps {start}-{end})" + (f": {a.message}" if a.message else "")
        if a.state != "firing":
            return [Action(ActionKind.RECORD, f"resolved {what}", {}, alert_event_id=a.event_id)]

        names = self.rules.get(a.kind)
        if a.kind == "loss_spike" and "loss_spike" not in self.cfg.rules:
            self.spikes.append(end)
            while self.spikes and self.spikes[0] < end - self.cfg.spike_window_steps:
                self.spikes.popleft()
            if len(self.spikes) >= self.cfg.spike_repeat:
                what += f"; {len(self.spikes)} spikes within {self.cfg.spike_window_steps} steps count as divergence"
                names = self.rules["divergence"]
                self.spikes.clear()
        if names is None:
            names = RECOMMENDED.get(a.recommended_action or "record", ["record"])

        if self._overlaps_handled(start, end) and set(names) & {"rollback", "scale_lr"}:
            h0, h1 = self.handled
            self.handled = (min(h0, start), max(h1, end))
            return [Action(ActionKind.RECORD, f"{what}; already handled by the rollback for steps {h0}-{h1}",
                           {"duplicate_of_incident": True}, alert_event_id=a.event_id)]
        if "rollback" in names:
            if self.rollbacks >= self.cfg.max_rollbacks:
                return [Action(ActionKind.HALT, f"{what}; {self.rollbacks} rollbacks already (max_rollbacks="
                               f"{self.cfg.max_rollbacks}): halting", {"rollbacks": self.rollbacks},
                               alert_event_id=a.event_id)]
            self.rollbacks += 1
            self.handled = (start, max(end, step))

        actions = []
        for name in names:
            if name == "rollback":
                actions.append(Action(ActionKind.ROLLBACK, what, {"before_step": start}, alert_event_id=a.event_id))
            elif name == "skip_data":
                actions.append(Action(ActionKind.SKIP_DATA, what, {"step_start": start, "step_end": end},
                                      alert_event_id=a.event_id))
            elif name == "scale_lr":
                actions.append(Action(ActionKind.SCALE_LR, what, {"factor": self.cfg.lr_cut}, alert_event_id=a.event_id))
            elif name in ("record", "notify"):
                actions.append(Action(ActionKind.RECORD, f"{name}: {what}", {"notify": name == "notify"},
                                      alert_event_id=a.event_id))
            else:
                actions.append(Action(ActionKind(name), what, {}, alert_event_id=a.event_id))
        return actions

    def _overlaps_handled(self, start: int, end: int) -> bool:
        # Overlap, not containment of the start: the loop's own alert after 5 non-finite steps
        # names 257-261 while the monitor's names 260-260, and either may arrive first.
        return self.handled is not None and start <= self.handled[1] and end >= self.handled[0]

    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": self.rollbacks, "spikes": list(self.spikes),
                "handled": list(self.handled) if self.handled else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollbacks = int(state.get("rollbacks", 0))
        self.spikes = deque(state.get("spikes", []))
        handled = state.get("handled")
        self.handled = (int(handled[0]), int(handled[1])) if handled else None
