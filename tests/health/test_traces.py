"""Labelled traces: the synthetic generator and the JSONL format recorded runs use too."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from services.health_monitor.config import ALERT_KINDS
from services.health_monitor.detectors import PER_LAYER_KINDS
from services.health_monitor.monitor import HealthMonitor
from tests.health.traces import (
    PROBE_KINDS,
    TraceFormatError,
    make_trace,
    play,
    read_jsonl,
)


def test_a_trace_survives_the_jsonl_round_trip(tmp_path: Path) -> None:
    trace = make_trace(4, ["non_finite", "dead_neurons", "trainer_stalled"], n_intervals=300)
    path = tmp_path / "t.jsonl"
    trace.write_jsonl(path)
    back = read_jsonl(path)
    assert [lab.to_json() for lab in back.incidents] == [lab.to_json() for lab in trace.incidents]
    assert (back.run_id, back.log_every, back.end_time, back.finished) == (
        trace.run_id, trace.log_every, trace.end_time, trace.finished)
    assert len(back.events) == len(trace.events)
    nan = [i for i, (_, m) in enumerate(back.events) if not math.isfinite(m.loss) or not math.isfinite(m.grad_norm)]
    assert nan, "the planted non-finite interval must survive as NaN/Infinity"
    sig = [(f.index, f.alert.incident_id, f.alert.state) for f in play(trace, HealthMonitor()).fired]
    assert [(f.index, f.alert.incident_id, f.alert.state) for f in play(back, HealthMonitor()).fired] == sig


def test_the_generator_is_deterministic_and_plants_what_it_is_asked() -> None:
    a, b = make_trace(9, n_intervals=600), make_trace(9, n_intervals=600)
    assert [m.model_dump_json() for _, m in a.events] == [m.model_dump_json() for _, m in b.events]
    fp16 = make_trace(9, ["loss_scale_collapse"], n_intervals=600, precision="fp16")
    assert [lab.kind for lab in fp16.incidents] == ["loss_scale_collapse"]
    assert all(m.loss_scale is not None for _, m in fp16.events)
    assert make_trace(9, ["loss_scale_collapse"], n_intervals=600, precision="bf16").incidents == []
    assert {lab.kind for lab in a.incidents} <= set(ALERT_KINDS)


def test_a_malformed_trace_file_says_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"type": "metrics", "received_at": 1.0, "payload": {
        "step": 1, "tokens_seen": 1, "loss": 1.0, "lr": 1.0, "grad_norm": 1.0, "seq_len": 1, "batch_size": 1}}) + "\n")
    with pytest.raises(TraceFormatError, match="no header"):
        read_jsonl(path)
    path.write_text(json.dumps({"type": "header", "incidents": [{"kind": "gremlins", "start": 0, "end": 1}]}) + "\n")
    with pytest.raises(TraceFormatError, match="gremlins"):
        read_jsonl(path)
    path.write_text("{oops\n")
    with pytest.raises(TraceFormatError, match="not JSON"):
        read_jsonl(path)


RECORDED = Path(__file__).resolve().parents[2] / "benchmarks" / "traces"
GRACE = 5  # as in benchmarks/health.py


@pytest.mark.parametrize("path", sorted(RECORDED.glob("*.jsonl")), ids=lambda p: p.stem)
def test_recorded_runs_every_incident_is_called_promptly_and_nothing_else(path: Path) -> None:
    """The traces recorded from real runs (benchmarks/record_traces.py) as regression cases."""
    trace = read_jsonl(path)
    fired = [f for f in play(trace, HealthMonitor()).fired if f.alert.state == "firing"]

    def covers(f, lab) -> bool:
        return (f.alert.kind == lab.kind or f.alert.kind in lab.also) and lab.start <= f.index <= lab.end + GRACE

    for lab in trace.incidents:
        if lab.detail.get("optional"):
            continue
        hits = [f.index for f in fired if f.alert.kind == lab.kind and lab.start <= f.index <= lab.end + GRACE
                and (lab.kind not in PER_LAYER_KINDS or f.alert.evidence.layer == lab.layer)]
        assert hits, f"{lab.kind} [{lab.start}, {lab.end}] {lab.layer or ''} not called"
        # A probe is measured every 10 steps here: its detectors may need the next measurement.
        # A lasting throughput fall is called on its third slow interval, and a label may start
        # earlier, on the probe step's own slow interval.
        allowed = 10 if lab.kind in PROBE_KINDS else 4 if lab.kind == "throughput_drop" else 2
        assert hits[0] - lab.start <= allowed, f"{lab.kind} {lab.layer or ''} called {hits[0] - lab.start} intervals late"
    false = [f"{f.alert.kind}@{f.index}: {f.alert.message}" for f in fired
             if not any(covers(f, lab) for lab in trace.incidents)]
    assert false == []
