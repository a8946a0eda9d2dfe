"""The learning rate of a step, from its four factors, each of which is reported.

    lr = schedule(step) x curriculum x control x fault

schedule    warmup + cosine (`optim.LRSchedule`): a pure function of the step
curriculum  the batch-size factor of the step's plan, sqrt(batch / reference)
control     operator and policy LR cuts (the ledger's lr_scale): survives rollbacks
fault       an injected lr_multiply fault: damage, so a rollback undoes it
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from shared.logging import get_logger

from .curriculum import StepPlan
from .faults import FaultInjector
from .optim import LRSchedule

log = get_logger("helox.trainer")


class ControlScale(Protocol):
    lr_scale: float


@dataclass(frozen=True)
class LRFactors:
    schedule: float  # the schedule's LR at this step (before the other factors)
    curriculum: float
    control: float
    fault: float

    @property
    def lr(self) -> float:
        return self.schedule * self.curriculum * self.control * self.fault

    def metrics(self) -> dict[str, float]:
        """The factors under their names in the metrics dict (and in contracts' TrainingMetrics)."""
        return {"lr_schedule": self.schedule, "lr_curriculum": self.curriculum, "lr_control": self.control,
                "lr_fault": self.fault}


class LRPolicy:
    """Computes a step's learning rate; the fault factor is its own state (saved in checkpoints)."""

    def __init__(self, schedule: LRSchedule, faults: FaultInjector, control: ControlScale) -> None:
        self.schedule, self.faults = schedule, faults
        self.control = control  # the ledger: read at every step, so a cut applies from the next one
        self.fault = 1.0

    def at(self, step: int, plan: StepPlan) -> LRFactors:
        """The factors for `step` (fires a due lr_multiply fault first)."""
        if (factor := self.faults.lr_factor(step)) is not None:
            self.fault *= factor
            log.warning("trainer.fault", fault="lr_multiply", step=step, factor=factor)
        return LRFactors(self.schedule(step), plan.lr_scale, self.control.lr_scale, self.fault)

    def undo_fault(self) -> None:
        """A rollback restores the model from before the damage: the fault's factor goes with it."""
        self.fault = 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"fault": self.fault}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fault = float(state.get("fault", 1.0))
