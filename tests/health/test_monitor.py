"""The monitor's incident lifecycle: one alert per incident, resolutions, cool-down,
escalation, stalls, rollbacks and the restart from history."""

from __future__ import annotations

import random
from typing import Any

import pytest
from pydantic import ValidationError

from contracts import (
    HealthAlert,
    RunFailed,
    TrainerAction,
    TrainingCompleted,
    TrainingStarted,
)
from services.health_monitor.config import HealthConfig, run_health_config
from services.health_monitor.monitor import HealthMonitor, incident_id
from tests.health.traces import Trace, make_trace

from .helpers import clean_series, env, metrics


def _firing(alerts: list[HealthAlert], kind: str | None = None) -> list[HealthAlert]:
    return [a for a in alerts if a.state == "firing" and (kind is None or a.kind == kind)]


def _feed(mon: HealthMonitor, ms: list, run: str = "r", t0: float = 0.0, dt: float = 10.0) -> list[HealthAlert]:
    out: list[HealthAlert] = []
    for k, m in enumerate(ms):
        out += mon.observe(run, m, t0 + k * dt)
    return out


# --- one alert per incident ---------------------------------------------------------------------


def test_a_lasting_condition_gives_one_alert_then_one_resolution_with_the_same_id() -> None:
    mon = HealthMonitor()
    ms = clean_series(60)
    for m in ms[30:50]:
        m.tokens_per_s = 10_000.0  # a fifth of the normal rate for 20 intervals
    out = _feed(mon, ms)
    fire = _firing(out, "throughput_drop")
    res = [a for a in out if a.kind == "throughput_drop" and a.state == "resolved"]
    assert len(fire) == 1 and len(res) == 1
    assert fire[0].incident_id == res[0].incident_id
    assert fire[0].step_start == ms[31].step  # two low intervals in a row
    assert res[0].step_end == ms[49].step and res[0].step_start == fire[0].step_start
    assert [a.state for a in out] == ["firing", "resolved"]


def test_a_flickering_condition_is_one_incident() -> None:
    mon = HealthMonitor()
    ms = clean_series(40)
    for k in range(20, 30, 2):
        ms[k].loss = float("nan")  # every other interval: clear for 1 < resolve_after (3)
    out = _feed(mon, ms)
    assert len(_firing(out, "non_finite")) == 1
    assert len([a for a in out if a.state == "resolved"]) == 1


def test_cooldown_holds_back_a_new_incident_until_it_ends() -> None:
    cfg = HealthConfig.model_validate({"alerts": {"policies": {
        "throughput_drop": {"severity": "warning", "action": "notify", "resolve_after": 2, "cooldown": 10}}}})
    mon = HealthMonitor(cfg)
    ms = clean_series(80)
    for k in list(range(30, 34)) + list(range(38, 60)):
        ms[k].tokens_per_s = 10_000.0
    out = _feed(mon, ms)
    fire = _firing(out, "throughput_drop")
    assert len(fire) == 2
    # Resolved after 2 clear intervals (34, 35: at index 35), quiet for 10 intervals: the
    # condition that came back at 38 opens its incident when the cool-down ends.
    assert fire[1].step_start == ms[46].step


def test_incident_ids_are_deterministic_and_distinct_per_layer() -> None:
    a = incident_id("run-1", "dead_neurons", "layers.1", 500)
    assert a == incident_id("run-1", "dead_neurons", "layers.1", 500)
    assert len({a, incident_id("run-1", "dead_neurons", "layers.2", 500), incident_id("run-2", "dead_neurons",
               "layers.1", 500), incident_id("run-1", "dead_neurons", "layers.1", 500, 1)}) == 4
    mon = HealthMonitor()
    out = _feed(mon, clean_series(5) + [metrics(60, float("nan"))])
    assert out[0].incident_id == incident_id("r", "non_finite", None, 60)


def test_repeated_loss_spikes_escalate_to_a_rollback() -> None:
    mon = HealthMonitor()
    ms = clean_series(120, noise=0.005)
    for k in (40, 60, 80):
        ms[k].loss *= 1.6
    spikes = _firing(_feed(mon, ms), "loss_spike")
    assert [(a.severity, a.recommended_action) for a in spikes] == [
        ("warning", "record"), ("warning", "record"), ("critical", "rollback")]
    assert "escalated" in spikes[-1].message


def test_a_redelivered_metrics_event_is_ignored() -> None:
    mon = HealthMonitor()
    ms = clean_series(20)
    _feed(mon, ms)
    bad = metrics(300, float("nan"))
    assert len(mon.observe("r", bad, 1.0)) == 1
    assert mon.observe("r", bad, 2.0) == []  # at-least-once delivery: the same event again


def test_runs_are_watched_independently() -> None:
    mon = HealthMonitor()
    for m in clean_series(20):
        mon.observe("a", m, 0.0)
        mon.observe("b", m, 0.0)
    assert mon.observe("a", metrics(300, float("nan")), 0.0)[0].kind == "non_finite"
    assert mon.open_incidents("b") == []


# --- the clock ---------------------------------------------------------------------------------


def test_a_silent_trainer_is_called_stalled_once_and_resolved_when_metrics_return() -> None:
    mon = HealthMonitor()
    mon.run_started("r", at=0.0)
    ms = clean_series(21)
    _feed(mon, ms[:20], t0=10.0)  # one every 10 s: the last at t=200
    assert mon.tick(200.0 + 119.0) == []  # the limit: max(120 s, 10 x 10 s)
    (first,) = mon.tick(200.0 + 121.0)
    run, alert = first
    assert (run, alert.kind, alert.severity, alert.state) == ("r", "trainer_stalled", "critical", "firing")
    assert alert.step_start == ms[19].step and alert.evidence.value > alert.evidence.threshold
    assert mon.tick(500.0) == [] and mon.tick(900.0) == []
    (res,) = mon.observe("r", ms[20], 950.0)
    assert res.state == "resolved" and res.incident_id == alert.incident_id


def test_a_run_that_never_sends_metrics_stalls_and_a_finished_run_does_not() -> None:
    mon = HealthMonitor()
    mon.run_started("quiet", at=0.0)
    mon.run_started("done", at=0.0)
    assert mon.run_finished("done") == []
    assert [(r, a.kind) for r, a in mon.tick(130.0)] == [("quiet", "trainer_stalled")]


def test_a_paused_trainer_is_not_stalled() -> None:
    mon = HealthMonitor()
    mon.run_started("r", at=0.0)
    _feed(mon, clean_series(10), t0=10.0)
    mon.handle(env(TrainerAction(action="pause", reason="operator", step=100), "r", 101.0))
    assert mon.tick(5000.0) == []
    mon.handle(env(TrainerAction(action="resume", reason="operator", step=100), "r", 6000.0))
    assert mon.tick(6100.0) == [] and [a.kind for _, a in mon.tick(6200.0)] == ["trainer_stalled"]


def test_handle_routes_lifecycle_events() -> None:
    mon = HealthMonitor()
    started = TrainingStarted(dataset_version="d", model_preset="tiny", n_params=10, total_steps=100, device="cpu",
                              precision="fp32")
    mon.handle(env(started, "r", 0.0))
    assert mon.active_runs == ["r"]
    assert [(r, a.kind) for r, a in mon.handle(env(metrics(10, float("nan")), "r", 5.0))] == [("r", "non_finite")]
    out = mon.handle(env(RunFailed(stage="train", reason="boom"), "r", 6.0))
    assert [(r, a.state) for r, a in out] == [("r", "resolved")]  # the open incident ends with the run
    assert mon.active_runs == [] and mon.tick(10_000.0) == []


# --- rollbacks ----------------------------------------------------------------------------------


def test_after_a_rollback_the_abandoned_steps_no_longer_count() -> None:
    mon = HealthMonitor()
    ms = clean_series(60, noise=0.003)
    out = _feed(mon, ms[:40])
    for k in range(8):  # runaway: +15% per interval
        out += mon.observe("r", metrics(410 + 10 * k, ms[39].loss * 1.15 ** (k + 1)), 0.0)
    assert len(_firing(out, "divergence")) == 1
    # The trainer restores step 300 and trains on: its losses are those of steps 310.. again.
    mon.handle(env(TrainerAction(action="rollback", reason="divergence", step=480,
                                 details={"restored_step": 300}), "r", 0.0))
    after = _feed(mon, [metrics(m.step, m.loss, tokens_seen=m.tokens_seen + 1) for m in ms[30:60]])
    assert _firing(after) == []
    assert {a.incident_id for a in after if a.state == "resolved"} == {a.incident_id for a in _firing(out)}


def test_a_rollback_seen_only_as_steps_going_back_rewinds_too() -> None:
    mon = HealthMonitor()
    ms = clean_series(60, noise=0.003)
    _feed(mon, ms[:40])
    mon.observe("r", metrics(410, ms[39].loss * 3), 0.0)
    mon.observe("r", metrics(420, ms[39].loss * 3), 0.0)
    after = _feed(mon, [metrics(m.step, m.loss, tokens_seen=m.tokens_seen + 1) for m in ms[35:60]])
    assert [a.kind for a in _firing(after)] == []


# --- restart ------------------------------------------------------------------------------------


def _timeline(trace: Trace, tick_s: float = 5.0) -> list[tuple[str, float, Any]]:
    """The service's inputs in order: start, metrics with ticks in between, end."""
    t0 = trace.events[0][0]
    items: list[tuple[str, float, Any]] = [("start", t0 - trace.interval_s, None)]
    nt = t0
    for t, m in trace.events:
        while nt < t:
            items.append(("tick", nt, None))
            nt += tick_s
        items.append(("metrics", t, m))
    while nt <= trace.end_time + tick_s:
        items.append(("tick", nt, None))
        nt += tick_s
    if trace.finished:
        items.append(("end", trace.end_time, None))
    return items


_STARTED = TrainingStarted(dataset_version="d", model_preset="tiny", n_params=10, total_steps=10**6, device="cpu",
                           precision="bf16")


def _run(mon: HealthMonitor, items: list, run: str) -> tuple[list[Any], list[tuple[float, HealthAlert]]]:
    """Drive a monitor; return the events it consumed (as the streams hold them) and its alerts."""
    history: list[Any] = []
    alerts: list[tuple[float, HealthAlert]] = []
    for what, t, m in items:
        if what == "start":
            history.append(env(_STARTED, run, t))
            out = mon.handle(history[-1])
        elif what == "metrics":
            history.append(env(m, run, t))
            out = mon.handle(history[-1])
        elif what == "tick":
            out = mon.tick(t)
        else:
            history.append(env(TrainingCompleted.model_construct(final_step=0), run, t))
            out = mon.handle(history[-1])
        alerts += [(t, a) for _, a in out]
    return history, alerts


def _sig(alerts: list[tuple[float, HealthAlert]]) -> list[tuple]:
    return [(a.incident_id, a.state, a.kind, a.step_start, a.step_end, a.severity, a.recommended_action)
            for _, a in alerts]


@pytest.fixture(scope="module")
def eventful() -> tuple[Trace, list]:
    trace = make_trace(3, ["throughput_drop", "loss_spike", "dead_neurons", "trainer_stalled", "divergence",
                           "non_finite", "token_drift"], n_intervals=900)
    assert len(trace.incidents) >= 6
    return trace, _timeline(trace)


def test_restart_from_history_neither_misses_nor_repeats_an_alert(eventful) -> None:
    trace, items = eventful
    run = trace.run_id
    _, whole = _run(HealthMonitor(), items, run)
    assert len(_firing([a for _, a in whole])) >= 6
    rng = random.Random(0)
    for cut in sorted(rng.sample(range(1, len(items) - 1), 6)) + [len(items) // 2]:
        history, before = _run(HealthMonitor(), items[:cut], run)
        published = [env(a, run, t) for t, a in before]
        restarted = HealthMonitor()
        assert restarted.replay(history + published) == []
        _, after = _run(restarted, items[cut:], run)
        assert _sig(before) + _sig(after) == _sig(whole), f"split at {cut}"


def test_restart_sends_what_the_previous_instance_detected_but_never_published(eventful) -> None:
    trace, items = eventful
    run = trace.run_id
    history, before = _run(HealthMonitor(), items[: len(items) * 3 // 4], run)
    assert len(before) >= 3
    published = [env(a, run, t) for t, a in before[:-1]]  # it crashed before publishing the last one
    pending = HealthMonitor().replay(history + published)
    assert [(r, a.incident_id, a.state) for r, a in pending] == [(run, before[-1][1].incident_id, before[-1][1].state)]


def test_restart_from_a_trimmed_history_resolves_the_open_incident_instead_of_firing_again() -> None:
    mon = HealthMonitor()
    ms = clean_series(120)
    for m in ms[60:100]:
        m.tokens_per_s = 10_000.0
    history, published = [], []
    for k, m in enumerate(ms[:80]):  # the drop is open at the restart
        history.append(env(m, "r", 10.0 * k))
        published += [env(a, "r", 10.0 * k) for a in mon.observe("r", m, 10.0 * k)]
    assert [a.payload.state for a in published] == ["firing"]
    restarted = HealthMonitor()
    assert restarted.replay(history[-20:] + published) == []  # the metrics stream was trimmed
    after = []
    for k, m in enumerate(ms[80:], start=80):
        after += restarted.observe("r", m, 10.0 * k)
    assert [(a.kind, a.state, a.incident_id) for a in after] == [
        ("throughput_drop", "resolved", published[0].payload.incident_id)]


# --- configuration -------------------------------------------------------------------------------


def test_config_rejects_unknown_keys_and_keeps_default_policies_on_partial_override() -> None:
    with pytest.raises(ValidationError):
        HealthConfig.model_validate({"loss_spike": {"z_treshold": 5}})
    with pytest.raises(ValidationError):
        HealthConfig.model_validate({"bogus": {}})
    cfg = HealthConfig.model_validate({"alerts": {"policies": {"token_drift": {"severity": "critical",
                                                                               "action": "skip_data"}}}})
    assert cfg.alerts.policies["token_drift"].action == "skip_data"
    assert cfg.alerts.policies["divergence"].action == "rollback_cut_lr"
    assert HealthConfig().alerts.policies["non_finite"].severity == "critical"


def test_disabled_detectors_stay_silent() -> None:
    mon = HealthMonitor(HealthConfig.model_validate({"non_finite": {"enabled": False}}))
    out = _feed(mon, clean_series(5) + [metrics(60, float("nan"))])
    assert out == []


# --- one config per run --------------------------------------------------------------------------

TIGHT = HealthConfig.model_validate({"loss_spike": {"z_threshold": 4.0, "min_rel_jump": 0.02}})


def _small_spike(n: int = 60, at: int = 40) -> list:
    ms = clean_series(n, noise=0.003)
    ms[at].loss *= 1.04  # under the default min_rel_jump (5%), over a lowered one
    return ms


def test_each_run_is_judged_by_its_own_config() -> None:
    mon = HealthMonitor()
    mon.configure_run("tight", TIGHT)
    tight = _firing(_feed(mon, _small_spike(), run="tight"))
    assert [(a.kind, a.step_start) for a in tight] == [("loss_spike", 410)]
    assert _feed(mon, _small_spike(), run="default") == []  # the same stream, the monitor's default config
    assert mon.config_for("tight") == TIGHT and mon.config_for("default") == mon.config


def test_a_config_given_after_the_first_metrics_takes_over_and_a_finished_run_forgets_it() -> None:
    mon = HealthMonitor()
    ms = _small_spike()
    _feed(mon, ms[:10], run="r")  # metrics overtook the run's TrainingStarted
    mon.configure_run("r", TIGHT)
    assert [a.kind for a in _firing(_feed(mon, ms[10:], run="r", t0=100.0))] == ["loss_spike"]
    mon.run_finished("r")
    assert mon.config_for("r") == mon.config


def test_replay_judges_each_run_by_the_config_it_was_given() -> None:
    history = [env(m, "tight", 10.0 * k) for k, m in enumerate(_small_spike())]
    restarted = HealthMonitor()
    restarted.configure_run("tight", TIGHT)
    pending = restarted.replay(history)  # never published: the previous instance detected, then crashed
    assert [(r, a.kind, a.state) for r, a in pending] == [("tight", "loss_spike", "firing"),
                                                          ("tight", "loss_spike", "resolved")]
    assert HealthMonitor().replay(history) == []


def test_a_runs_health_section_is_laid_over_the_deployments() -> None:
    deployment = {"loss_spike": {"z_threshold": 4.0, "window": 32}, "stall": {"min_s": 60.0}}
    run = {"name": "r", "health": {"loss_spike": {"min_rel_jump": 0.02, "window": 48}}}
    cfg = run_health_config(deployment, run)
    assert (cfg.loss_spike.z_threshold, cfg.loss_spike.min_rel_jump, cfg.loss_spike.window) == (4.0, 0.02, 48)
    assert cfg.stall.min_s == 60.0
    assert run_health_config(deployment, {"name": "no-health"}) == HealthConfig.model_validate(deployment)
    with pytest.raises(ValidationError, match="min_rel_jump"):
        run_health_config({}, {"health": {"loss_spike": {"min_rel_jump": -1}}})
