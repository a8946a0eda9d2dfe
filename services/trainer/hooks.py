"""Named points in the training loop where probes and emitters plug in (Composer-style).

A callback subclasses `Callback` and overrides the `on_<event>` methods it needs; a plain
function can be registered for one event with `Hooks.on(event, fn)`. The loop only calls
`hooks.fire(...)`: adding a probe or an emitter never touches the loop.

Events and their keyword payloads (`trainer` is always the first argument):

    train_start  resumed_from: int | None
    batch        batch: dict[str, Tensor] (CPU, this rank's micro-batch), step: int
    step_end     result: StepResult
    probe        ctx: ProbeContext (write values with ctx.record)
    log          metrics: dict (rank 0 only)
    eval         val_loss: float, step: int
    checkpoint   info: CheckpointInfo, reason: str (rank 0 only)
    action       action: Action (its .reason says why)
    train_end    result: TrainingResult

A callback with a `name` and `state_dict()`/`load_state_dict()` is saved in checkpoints.

An *observer* (`observer = True`: the emitters, W&B, the bus) only reports what the loop does;
its failure is logged and counted (`Hooks.observer_failures`), never fatal to the run. Any
other callback's error (a probe) propagates: the loop's numbers would be wrong without it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Any

from shared.logging import get_logger

log = get_logger("helox.trainer")


class Event(StrEnum):
    TRAIN_START = "train_start"
    BATCH = "batch"
    STEP_END = "step_end"
    PROBE = "probe"
    LOG = "log"
    EVAL = "eval"
    CHECKPOINT = "checkpoint"
    ACTION = "action"
    TRAIN_END = "train_end"


class Callback:
    """Base class: override any `on_<event>(self, trainer, **payload)`."""

    name: str | None = None
    observer: bool = False
    """True for a callback that only reports (an emitter): its errors are counted, not raised."""

    def close(self) -> None:
        """Release resources (files, W&B run) at the end of training."""


class Hooks:
    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks: list[Callback] = []
        self._functions: dict[Event, list[Callable[..., Any]]] = defaultdict(list)
        self.observer_failures: Counter[str] = Counter()
        """Errors of observer callbacks, by callback (its name, else its class)."""
        for cb in callbacks:
            self.add(cb)

    def add(self, callback: Callback) -> Callback:
        if callback.name is not None and any(c.name == callback.name for c in self.callbacks):
            raise ValueError(f"a callback named {callback.name!r} is already registered; give each a unique name")
        self.callbacks.append(callback)
        return callback

    def on(self, event: Event | str, fn: Callable[..., Any]) -> None:
        self._functions[Event(event)].append(fn)

    def wants(self, event: Event) -> bool:
        method = f"on_{event.value}"
        return bool(self._functions[event]) or any(hasattr(cb, method) for cb in self.callbacks)

    def fire(self, event: Event, trainer: Any, **payload: Any) -> None:
        method = f"on_{event.value}"
        for cb in self.callbacks:
            handler = getattr(cb, method, None)
            if handler is not None:
                if cb.observer:
                    self._observe(cb, method, handler, trainer, payload)
                else:
                    handler(trainer, **payload)
        for fn in self._functions[event]:
            fn(trainer, **payload)

    def state_dict(self) -> dict[str, Any]:
        return {cb.name: cb.state_dict() for cb in self.callbacks if cb.name and hasattr(cb, "state_dict")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for cb in self.callbacks:
            if cb.name and hasattr(cb, "load_state_dict") and cb.name in state:
                cb.load_state_dict(state[cb.name])

    def _observe(self, cb: Callback, method: str, handler: Callable[..., Any], trainer: Any,
                 payload: dict[str, Any]) -> None:
        try:
            handler(trainer, **payload)
        except Exception as exc:
            self._failed(cb, method, exc)

    def _failed(self, cb: Callback, method: str, exc: Exception) -> None:
        label = cb.name or type(cb).__name__
        self.observer_failures[label] += 1
        log.warning("observer callback failed; the run goes on", callback=label, hook=method,
                    error=f"{type(exc).__name__}: {exc}", failures=self.observer_failures[label])

    def close(self) -> None:
        for cb in self.callbacks:
            if not cb.observer:
                cb.close()
                continue
            try:
                cb.close()
            except Exception as exc:
                self._failed(cb, "close", exc)
