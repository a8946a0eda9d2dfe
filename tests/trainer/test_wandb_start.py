"""W&B starts before the first step (train_start), never inside a step at the first log."""

from __future__ import annotations

import sys
import types

from services.trainer.loop import Trainer

from .helpers import Recorder, make_config


def _fake_wandb(events: list) -> types.ModuleType:
    mod = types.ModuleType("wandb")

    class Run:
        def log(self, data, step):
            events.append(("log", step))

        def finish(self):
            events.append(("finish",))

    def init(**kwargs):
        events.append(("init", kwargs["mode"], kwargs["settings"].kw))
        return Run()

    class Settings:
        def __init__(self, **kw):
            self.kw = kw

    mod.init, mod.Settings = init, Settings
    return mod


def test_wandb_init_runs_at_train_start_before_step_1(source, tmp_path, monkeypatch):
    events: list = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(events))

    class Steps(Recorder):
        def on_step_end(self, trainer, result):
            events.append(("step", result.step))

    cfg = make_config(max_steps=4, log={"every": 2, "wandb": {"mode": "offline"}})
    Trainer(cfg, source(), tmp_path, callbacks=[Steps()]).fit()
    kinds = [e[0] for e in events]
    assert kinds[0] == "init" and kinds.count("init") == 1, events
    assert events[0][1] == "offline" and events[0][2]["x_disable_stats"] is True
    assert kinds.index("init") < kinds.index("step") < kinds.index("log")
    assert ("log", 2) in events and ("log", 4) in events and kinds[-1] == "finish"


def test_disabled_wandb_is_never_imported(source, tmp_path, monkeypatch):
    events: list = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(events))
    Trainer(make_config(max_steps=2, log={"every": 1}), source(), tmp_path).fit()  # mode: disabled
    assert events == []
