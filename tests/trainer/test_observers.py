"""A failing observer (an emitter, W&B, the bus) is logged and counted, never fatal; a failing
probe (not an observer: the loop's numbers depend on it) still stops the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.trainer.hooks import Callback, Event, Hooks
from services.trainer.loop import Trainer
from services.trainer.metrics import FunctionEmitter, StructlogEmitter, WandbEmitter

from .helpers import make_config


class BrokenEmitter(Callback):
    observer = True
    name = "broken-emitter"

    def __init__(self) -> None:
        self.calls = 0

    def on_log(self, trainer, metrics):
        self.calls += 1
        raise OSError("the metrics sink is full")

    def close(self) -> None:
        raise RuntimeError("cannot flush")


class BrokenProbe(Callback):
    def on_step_end(self, trainer, result):
        raise ValueError("probe bug")


def test_the_emitters_are_observers() -> None:
    assert StructlogEmitter.observer and FunctionEmitter.observer and WandbEmitter.observer
    assert not Callback.observer


def test_an_observer_error_is_counted_and_the_others_still_run() -> None:
    broken, seen = BrokenEmitter(), []
    hooks = Hooks([broken, FunctionEmitter(seen.append)])
    hooks.fire(Event.LOG, None, metrics={"step": 1})
    hooks.fire(Event.LOG, None, metrics={"step": 2})
    hooks.close()
    assert broken.calls == 2 and seen == [{"step": 1}, {"step": 2}]
    assert hooks.observer_failures == {"broken-emitter": 3}  # two logs and the close


def test_a_non_observer_error_propagates() -> None:
    hooks = Hooks([BrokenProbe()])
    with pytest.raises(ValueError, match="probe bug"):
        hooks.fire(Event.STEP_END, None, result=None)


def test_training_finishes_despite_a_failing_observer(source, tmp_path: Path) -> None:
    broken = BrokenEmitter()
    trainer = Trainer(make_config(max_steps=4, log={"every": 1}), source(), tmp_path, callbacks=[broken])
    result = trainer.fit()
    assert result.status == "completed" and result.final_step == 4
    assert broken.calls == 4 and trainer.hooks.observer_failures["broken-emitter"] == 5
