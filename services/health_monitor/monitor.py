"""The health monitor: detector findings -> incidents -> HealthAlert payloads.

Per (run, kind, key) at most one incident is open (key: see `detectors.incident_key`).
An incident opens with one `firing` alert when its condition first holds, absorbs every
later interval on which it still holds, and closes with one `resolved` alert (same
incident_id) once the condition has been clear for `resolve_after` judged intervals. After
a resolution the same (kind, key) stays quiet for `cooldown` intervals, so a condition
flickering around its threshold gives one incident, not a stream of them; a condition
still true when the cool-down ends opens its incident then.

Each run is judged with its own HealthConfig (`configure_run`: the run's `health:` section
over the deployment's), and with the monitor's default config when it has none.

Incident ids are a hash of (run_id, kind, key, step_start), plus an ordinal when the same
tuple recurs (a rollback can replay the same steps), so that a restarted monitor that
replays the history computes the same ids. `replay` rebuilds the monitor from the
metrics and the alerts already published, and returns only what was never sent.

Pure: time comes in as arguments (`received_at`, `tick(now)`); no I/O.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from contracts.envelope import Envelope
from contracts.events import (
    AlertEvidence,
    HealthAlert,
    RunFailed,
    TrainerAction,
    TrainingCompleted,
    TrainingMetrics,
    TrainingStarted,
)

from .config import HealthConfig
from .detectors import (
    Detector,
    Finding,
    Observation,
    build_detectors,
    check_stall,
    incident_key,
)


class MonitorError(ValueError):
    """An event the monitor cannot use (e.g. metrics without a run id)."""


def incident_id(run_id: str, kind: str, key: str | None, step_start: int, ordinal: int = 0) -> str:
    """Deterministic incident id: the same incident gets the same id after a restart."""
    base = f"{run_id}\x1f{kind}\x1f{key or ''}\x1f{step_start}"
    if ordinal:
        base += f"\x1f{ordinal}"
    return "inc-" + hashlib.sha256(base.encode()).hexdigest()[:20]


@dataclass
class Incident:
    incident_id: str
    kind: str
    key: str | None
    step_start: int
    step_end: int
    severity: str
    action: str
    layer: str | None = None
    clear: int = 0  # judged intervals in a row on which the condition did not hold


@dataclass
class _Run:
    config: HealthConfig
    detectors: list[Detector]
    active: bool = False
    paused: bool = False  # the trainer said it paused (TrainerAction 'pause'): silence is expected
    started_at: float | None = None
    last_seen: float | None = None
    last_step: int | None = None
    last_fingerprint: tuple | None = None
    last_probes: dict[str, float] | None = None
    gaps: list[float] = field(default_factory=list)
    intervals: int = 0
    open: dict[tuple[str, str | None], Incident] = field(default_factory=dict)
    cooldown_until: dict[tuple[str, str | None], int] = field(default_factory=dict)
    spike_starts: list[int] = field(default_factory=list)
    ordinals: Counter = field(default_factory=Counter)  # (kind, key, step_start) -> incidents opened
    published: set[tuple[str, str]] = field(default_factory=set)  # (incident_id, state) already sent


def _fingerprint(m: TrainingMetrics) -> tuple:
    # Equal for a redelivered event, different for the next interval and for the same step
    # logged again after a rollback (tokens_seen and the data cursor move on).
    return (m.step, m.tokens_seen, m.data_cursor, repr(m.loss), repr(m.grad_norm))


class HealthMonitor:
    """Turns TrainingMetrics streams (one per run) into HealthAlert incidents.

    Feed it with `observe` (metrics), `run_started` / `run_finished` (lifecycle), `tick`
    (the clock, for stalled trainers) — or with whole envelopes through `handle`.
    """

    def __init__(self, config: HealthConfig | None = None) -> None:
        self.config = config or HealthConfig()  # the default: for every run not given its own
        self._runs: dict[str, _Run] = {}
        self._configs: dict[str, HealthConfig] = {}

    # --- lifecycle ---------------------------------------------------------------------------

    def _run(self, run_id: str) -> _Run:
        st = self._runs.get(run_id)
        if st is None:
            config = self.config_for(run_id)
            st = self._runs[run_id] = _Run(config, build_detectors(config))
        return st

    def configure_run(self, run_id: str, config: HealthConfig) -> None:
        """Judge `run_id` with `config` from now on (call it before the run's first event).

        A run already watched with another config gets fresh detectors built from this one
        (its windows start over; its open incidents stay): that only happens when metrics
        overtook the run's TrainingStarted.
        """
        self._configs[run_id] = config
        st = self._runs.get(run_id)
        if st is not None and st.config != config:
            st.config, st.detectors = config, build_detectors(config)
            st.gaps = st.gaps[-config.stall.gap_window:]

    def config_for(self, run_id: str) -> HealthConfig:
        """The config `run_id` is judged with."""
        return self._configs.get(run_id, self.config)

    def run_started(self, run_id: str, at: float | None = None) -> None:
        """A run started or resumed: it is watched for stalls from `at` (or the next tick)."""
        st = self._run(run_id)
        st.active = True
        st.started_at = at
        st.last_seen = None

    def run_finished(self, run_id: str) -> list[HealthAlert]:
        """A run completed or failed: stop watching it; resolutions for incidents still open."""
        st = self._runs.pop(run_id, None)
        self._configs.pop(run_id, None)
        if st is None or not st.config.alerts.resolve_on_run_end:
            return []
        out = []
        for inc in list(st.open.values()):
            alert = self._resolution(run_id, st, inc, None, f"run ended with {inc.kind} open since step {inc.step_start}")
            if alert is not None:
                out.append(alert)
        return out

    def rolled_back(self, run_id: str, restored_step: int) -> None:
        """The trainer restored the checkpoint of `restored_step`: later history is abandoned."""
        st = self._runs.get(run_id)
        if st is None:
            return
        for d in st.detectors:
            d.rewind(restored_step + 1)
        st.last_step = restored_step
        st.last_probes = None

    @property
    def active_runs(self) -> list[str]:
        return [r for r, st in self._runs.items() if st.active]

    def open_incidents(self, run_id: str) -> list[Incident]:
        st = self._runs.get(run_id)
        return [] if st is None else list(st.open.values())

    # --- metrics -----------------------------------------------------------------------------

    def observe(self, run_id: str, metrics: TrainingMetrics, received_at: float) -> list[HealthAlert]:
        """One TrainingMetrics event of a run: the alerts (firing/resolved) it causes."""
        if not run_id:
            raise MonitorError("TrainingMetrics without a run_id: the trainer must set the envelope's run_id")
        st = self._run(run_id)
        fp = _fingerprint(metrics)
        if fp == st.last_fingerprint:
            return []  # an at-least-once redelivery of the event just seen
        st.last_fingerprint = fp
        st.active = True
        out: list[HealthAlert] = []
        if st.last_seen is not None and received_at > st.last_seen:
            st.gaps.append(received_at - st.last_seen)
            if len(st.gaps) > st.config.stall.gap_window:
                del st.gaps[0]
        stalled = st.open.get(("trainer_stalled", None))
        if stalled is not None:
            clear = check_stall(st.config.stall, received_at, received_at, st.gaps, metrics.step)
            out += self._apply(run_id, st, clear, metrics.step)
        st.last_seen = received_at
        if st.last_step is not None and metrics.step < st.last_step:
            for d in st.detectors:  # a rollback without its TrainerAction: rewind to what we know
                d.rewind(metrics.step)
            st.last_probes = None
        st.last_step = metrics.step
        obs = Observation(metrics, metrics.probes != st.last_probes)
        st.last_probes = metrics.probes
        for d in st.detectors:
            for f in d.update(obs):
                out += self._apply(run_id, st, f, metrics.step)
        st.intervals += 1
        return out

    def tick(self, now: float) -> list[tuple[str, HealthAlert]]:
        """The clock: alerts for active runs whose metrics stopped for too long."""
        out = []
        for run_id, st in self._runs.items():
            if not st.active or st.paused or not st.config.stall.enabled:
                continue
            if st.last_seen is None and st.started_at is None:
                st.started_at = now  # started without a timestamp: count from the first tick
            last = st.last_seen if st.last_seen is not None else st.started_at
            f = check_stall(st.config.stall, now, last, st.gaps, st.last_step)
            if f.active:
                out += [(run_id, a) for a in self._apply(run_id, st, f, st.last_step or 0)]
        return out

    # --- incidents ---------------------------------------------------------------------------

    def _apply(self, run_id: str, st: _Run, f: Finding, step: int) -> list[HealthAlert]:
        k = (f.kind, f.key)
        inc = st.open.get(k)
        if f.active:
            if inc is not None:
                inc.step_end = max(inc.step_end, step)
                inc.clear = 0
                return []
            if st.intervals <= st.cooldown_until.get(k, -1):
                return []
            return self._open(run_id, st, f, step)
        if inc is None:
            return []
        inc.clear += 1
        if inc.clear < st.config.alerts.policies[f.kind].resolve_after:  # type: ignore[index]
            return []
        alert = self._resolution(run_id, st, inc, f, f"{inc.kind}{f' in {inc.layer}' if inc.layer else ''} resolved: "
                                 f"clear for {inc.clear} intervals since step {inc.step_end}")
        return [alert] if alert is not None else []

    def _open(self, run_id: str, st: _Run, f: Finding, step: int) -> list[HealthAlert]:
        cfg = st.config.alerts
        pol = cfg.policies[f.kind]  # type: ignore[index]
        severity, action, message = pol.severity, pol.action, f.message
        if f.kind == "loss_spike":
            spike = st.config.loss_spike
            window = spike.repeat_window_steps
            recent = [s for s in st.spike_starts if abs(step - s) <= window]
            st.spike_starts = recent + [step]
            if len(st.spike_starts) >= spike.repeat_k:
                severity, action = cfg.escalated_severity, cfg.escalated_action
                message += f" ({len(st.spike_starts)} spikes within {window} steps: escalated)"
        base = (f.kind, f.key, step)
        ordinal = st.ordinals[base]
        st.ordinals[base] += 1
        inc = Incident(incident_id(run_id, f.kind, f.key, step, ordinal), f.kind, f.key, step, step, severity, action,
                       f.layer)
        st.open[(f.kind, f.key)] = inc
        alert = HealthAlert(
            incident_id=inc.incident_id, kind=f.kind, severity=severity, state="firing",  # type: ignore[arg-type]
            step_start=step, step_end=step, evidence=f.evidence(), recommended_action=action,  # type: ignore[arg-type]
            message=message,
        )
        return self._emit(st, alert)

    def _resolution(self, run_id: str, st: _Run, inc: Incident, f: Finding | None, message: str) -> HealthAlert | None:
        k = (inc.kind, inc.key)
        st.open.pop(k, None)
        st.cooldown_until[k] = st.intervals + st.config.alerts.policies[inc.kind].cooldown  # type: ignore[index]
        if f is not None:
            evidence = f.evidence()
            evidence.layer = evidence.layer or inc.layer
        else:
            evidence = AlertEvidence(statistic="run_ended", value=0.0, threshold=0.0, layer=inc.layer)
        alert = HealthAlert(
            incident_id=inc.incident_id, kind=inc.kind, severity=inc.severity, state="resolved",  # type: ignore[arg-type]
            step_start=inc.step_start, step_end=max(inc.step_end, inc.step_start), evidence=evidence,
            recommended_action=inc.action, message=message,  # type: ignore[arg-type]
        )
        emitted = self._emit(st, alert)
        return emitted[0] if emitted else None

    @staticmethod
    def _emit(st: _Run, alert: HealthAlert) -> list[HealthAlert]:
        sig = (alert.incident_id, alert.state)
        if sig in st.published:
            return []  # sent before a restart: the state change stands, the message does not repeat
        st.published.add(sig)
        return [alert]

    # --- history and restart -----------------------------------------------------------------

    def observe_alert(self, run_id: str, alert: HealthAlert) -> None:
        """An alert already published (read back from the stream): never send it again.

        Call it for the whole alert history before replaying metrics (`replay` does).
        """
        st = self._run(run_id)
        st.published.add((alert.incident_id, alert.state))

    def _adopt(self, run_id: str, alerts: list[HealthAlert], pending: list[tuple[str, HealthAlert]]) -> None:
        """Make the state agree with the alerts published for a run.

        With the whole history replayed this changes nothing: the replay regenerated every
        published incident. With a trimmed history it restores incidents that were open
        when the previous instance stopped, so that they resolve rather than fire again.
        """
        st = self._run(run_id)
        resolved = {a.incident_id for a in alerts if a.state == "resolved"}
        open_ids = {inc.incident_id for inc in st.open.values()}
        for a in alerts:
            if a.state != "firing":
                continue
            key = incident_key(a.kind, a.evidence)
            base = (a.kind, key, a.step_start)
            for n in range(st.ordinals[base] + 8):  # recover the ordinal the id was made with
                if incident_id(run_id, a.kind, key, a.step_start, n) == a.incident_id:
                    st.ordinals[base] = max(st.ordinals[base], n + 1)
                    break
            if a.kind == "loss_spike" and a.step_start not in st.spike_starts:
                st.spike_starts.append(a.step_start)
            k = (a.kind, key)
            cur = st.open.get(k)
            if a.incident_id in resolved:
                if cur is not None and cur.incident_id == a.incident_id:
                    st.open.pop(k)  # resolved before the restart though the trimmed replay saw no clearing
                continue
            if a.incident_id in open_ids:
                continue
            if cur is not None and (cur.incident_id, "firing") not in {(x.incident_id, x.state) for x in alerts}:
                # The trimmed replay opened the same incident at a later step than the one published:
                # keep the published id and drop the unsent duplicate.
                pending[:] = [(r, p) for r, p in pending if p.incident_id != cur.incident_id]
                st.published.discard((cur.incident_id, "firing"))
            st.open[k] = Incident(a.incident_id, a.kind, key, a.step_start, a.step_end, a.severity,
                                  a.recommended_action, a.evidence.layer)

    def handle(self, env: Envelope[Any], received_at: float | None = None) -> list[tuple[str, HealthAlert]]:
        """Feed any envelope the monitor cares about; others are ignored.

        TrainingMetrics -> observe; TrainingStarted -> run_started; TrainingCompleted and
        RunFailed -> run_finished; TrainerAction rollback (details.restored_step) ->
        rolled_back, pause/resume -> no stall alerts while paused; HealthAlert ->
        observe_alert. `received_at` defaults to occurred_at.
        """
        p, run_id = env.payload, env.run_id
        at = env.occurred_at.timestamp() if received_at is None else received_at
        if run_id is None:
            return []
        if isinstance(p, TrainingMetrics):
            return [(run_id, a) for a in self.observe(run_id, p, at)]
        if isinstance(p, TrainingStarted):
            self.run_started(run_id, at)
        elif isinstance(p, (TrainingCompleted, RunFailed)):
            return [(run_id, a) for a in self.run_finished(run_id)]
        elif isinstance(p, TrainerAction):
            if p.action == "rollback":
                restored = p.details.get("restored_step")
                if isinstance(restored, (int, float)) and not isinstance(restored, bool) and math.isfinite(restored):
                    self.rolled_back(run_id, int(restored))
            elif p.action in ("pause", "resume"):
                st = self._run(run_id)
                st.paused = p.action == "pause"
                if not st.paused:
                    st.last_seen = at  # the silence counts from the resumption
        elif isinstance(p, HealthAlert):
            self.observe_alert(run_id, p)
        return []

    def replay(self, events: Iterable[Envelope[Any]]) -> list[tuple[str, HealthAlert]]:
        """Rebuild the state from history after a restart.

        `events`: the recent metrics, lifecycle events and actions of the runs, and the
        HealthAlert events this monitor published (any order: they are sorted by
        occurred_at, stably); the runs' own configs given beforehand (`configure_run`). Returns the alerts the history implies but that were never
        published (the previous instance stopped between detecting and publishing):
        publish them. Alerts already published are never returned again.
        """
        events = sorted(events, key=lambda e: e.occurred_at)
        alerts: dict[str, list[HealthAlert]] = {}
        for env in events:
            if isinstance(env.payload, HealthAlert) and env.run_id is not None:
                self.observe_alert(env.run_id, env.payload)
                alerts.setdefault(env.run_id, []).append(env.payload)
        pending: list[tuple[str, HealthAlert]] = []
        for env in events:
            if isinstance(env.payload, HealthAlert):
                continue
            if isinstance(env.payload, TrainingMetrics):
                # The clock the previous instance had: a silence long enough to be a stall was
                # one (its alert is in the history, or was never sent).
                pending += self.tick(env.occurred_at.timestamp())
            pending += self.handle(env)
        for run_id, published in alerts.items():
            if run_id in self._runs:
                self._adopt(run_id, published, pending)
        return pending
