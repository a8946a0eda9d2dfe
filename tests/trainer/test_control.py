"""The control policy: alerts and commands -> actions (pure)."""

from __future__ import annotations

import pytest

from services.trainer.config import ControlConfig
from services.trainer.control import ActionKind, Alert, Command, ControlError, ControlPolicy


def kinds(actions):
    return [a.kind for a in actions]


@pytest.mark.parametrize("kind", ["non_finite", "grad_explosion"])
def test_non_finite_or_exploding_gradients_roll_back_skip_the_window_and_halve_the_lr(kind):
    p = ControlPolicy()
    actions = p.decide(Alert(kind, "critical", 40, 45, event_id="e1"), step=46)
    assert kinds(actions) == [ActionKind.ROLLBACK, ActionKind.SKIP_DATA, ActionKind.SCALE_LR]
    assert actions[0].params == {"before_step": 40}
    assert actions[1].params == {"step_start": 40, "step_end": 45}
    assert actions[2].params == {"factor": 0.5}
    assert all(a.alert_event_id == "e1" for a in actions) and "40-45" in actions[0].reason


def test_divergence_rolls_back_and_cuts_the_lr():
    assert kinds(ControlPolicy().decide(Alert("divergence", step_start=10, step_end=20), 21)) == [
        ActionKind.ROLLBACK, ActionKind.SCALE_LR]


def test_a_spike_is_recorded_unless_repeated():
    p = ControlPolicy(ControlConfig(spike_repeat=3, spike_window_steps=100))
    assert kinds(p.decide(Alert("loss_spike", step_start=10, step_end=10), 10)) == [ActionKind.RECORD]
    assert kinds(p.decide(Alert("loss_spike", step_start=300, step_end=300), 300)) == [ActionKind.RECORD]
    assert kinds(p.decide(Alert("loss_spike", step_start=320, step_end=320), 320)) == [ActionKind.RECORD]
    assert kinds(p.decide(Alert("loss_spike", step_start=350, step_end=350), 350)) == [
        ActionKind.ROLLBACK, ActionKind.SCALE_LR]


def test_stagnation_only_notifies():
    (a,) = ControlPolicy().decide(Alert("stagnation", "info", 1, 100), 100)
    assert a.kind is ActionKind.RECORD and a.params["notify"] is True


def test_too_many_rollbacks_halt_the_run():
    p = ControlPolicy(ControlConfig(max_rollbacks=2))
    for step in (10, 20):  # two separate incidents
        assert kinds(p.decide(Alert("divergence", step_start=step, step_end=step), step))[0] is ActionKind.ROLLBACK
    (halt,) = p.decide(Alert("divergence", step_start=30, step_end=30), 30)
    assert halt.kind is ActionKind.HALT and "max_rollbacks=2" in halt.reason


def test_a_second_alert_about_an_incident_already_rolled_back_is_only_recorded():
    p = ControlPolicy()
    first = p.decide(Alert("grad_explosion", step_start=46, step_end=46), 52)
    assert kinds(first) == [ActionKind.ROLLBACK, ActionKind.SKIP_DATA, ActionKind.SCALE_LR]
    (dup,) = p.decide(Alert("divergence", step_start=46, step_end=48), 53)
    assert dup.kind is ActionKind.RECORD and "already handled" in dup.reason
    assert p.rollbacks == 1
    later = p.decide(Alert("divergence", step_start=90, step_end=92), 95)  # a new incident
    assert kinds(later)[0] is ActionKind.ROLLBACK
    restored = ControlPolicy()
    restored.load_state_dict(p.state_dict())
    assert restored.handled == p.handled


def test_unknown_kinds_follow_the_recommended_action_and_rules_override():
    p = ControlPolicy()
    assert kinds(p.decide(Alert("token_drift", recommended_action="cut_lr"), 3)) == [ActionKind.SCALE_LR]
    assert kinds(p.decide(Alert("dead_neurons"), 3)) == [ActionKind.RECORD]
    q = ControlPolicy(ControlConfig(rules={"stagnation": ["scale_lr"]}))
    assert kinds(q.decide(Alert("stagnation"), 3)) == [ActionKind.SCALE_LR]
    with pytest.raises(ControlError, match="unknown actions"):
        ControlPolicy(ControlConfig(rules={"x": ["explode"]}))


def test_resolved_alerts_are_only_recorded():
    assert kinds(ControlPolicy().decide(Alert("non_finite", state="resolved"), 3)) == [ActionKind.RECORD]


def test_commands_map_to_actions_with_their_arguments():
    p = ControlPolicy()
    assert p.decide(Command("scale_lr", 0.25, event_id="c"), 1)[0].params == {"factor": 0.25}
    assert p.decide(Command("skip_data", 64), 1)[0].params == {"samples": 64}
    for name, kind in [("pause", ActionKind.PAUSE), ("resume", ActionKind.RESUME), ("stop", ActionKind.STOP),
                       ("checkpoint", ActionKind.CHECKPOINT), ("rollback", ActionKind.ROLLBACK)]:
        assert p.decide(Command(name, reason="ops"), 1)[0].kind is kind
    with pytest.raises(ControlError, match="positive value"):
        p.decide(Command("scale_lr"), 1)
    with pytest.raises(ControlError, match="unknown command"):
        p.decide(Command("explode"), 1)


def test_policy_state_round_trips():
    p = ControlPolicy()
    p.decide(Alert("divergence"), 1)
    p.decide(Alert("loss_spike", step_end=3), 3)
    q = ControlPolicy()
    q.load_state_dict(p.state_dict())
    assert q.rollbacks == 1 and list(q.spikes) == [3]


@pytest.mark.parametrize("loop_first", [True, False], ids=["loop-alert-first", "monitor-alert-first"])
def test_overlapping_alerts_of_one_incident_cost_one_rollback_one_lr_cut_and_one_skip(loop_first):
    # Issue 15: a NaN at step 257. The loop's own alert after 5 non-finite steps names 257-261, the
    # health monitor's names 260-260; both are decided before step 262, in either order.
    loop = Alert("non_finite", "critical", 257, 261, "rollback_cut_lr", "5 consecutive non-finite steps (loop)")
    monitor = Alert("non_finite", "critical", 260, 260, "rollback_cut_lr", event_id="m1")
    p = ControlPolicy()
    first, second = (loop, monitor) if loop_first else (monitor, loop)
    assert kinds(p.decide(first, 261)) == [ActionKind.ROLLBACK, ActionKind.SKIP_DATA, ActionKind.SCALE_LR]
    (dup,) = p.decide(second, 261)
    assert dup.kind is ActionKind.RECORD and "already handled" in dup.reason and dup.params["duplicate_of_incident"]
    assert p.rollbacks == 1
    # A late third detector naming any part of either window is the same incident too.
    assert kinds(p.decide(Alert("divergence", step_start=257, step_end=258), 262)) == [ActionKind.RECORD]
    # Steps after the incident are a new one.
    assert kinds(p.decide(Alert("non_finite", step_start=262, step_end=262), 262))[0] is ActionKind.ROLLBACK
