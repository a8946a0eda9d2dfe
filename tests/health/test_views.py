"""The HTML report and the live terminal view, built from events alone."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest
from rich.console import Console

from contracts import TrainerAction, TrainingCompleted, TrainingStarted
from contracts.envelope import ArtifactRef
from helox.report import nice_ticks, render_report
from helox.watch import render_watch, sparkline
from services.health_monitor.monitor import HealthMonitor
from tests.health.traces import make_trace

from .helpers import env

SVG = "{http://www.w3.org/2000/svg}svg"
REF = ArtifactRef(uri="file:///a/ckpt/manifest.json", sha256="0" * 64, size_bytes=1)


@pytest.fixture(scope="module")
def run_events() -> list:
    """A run with a NaN, a divergence rolled back, and the alerts a monitor raised on it."""
    trace = make_trace(5, ["non_finite", "divergence", "throughput_drop"], n_intervals=400)
    run = "run<&>1"  # markup in an id must be escaped
    t0 = trace.events[0][0]
    events = [env(TrainingStarted(dataset_version="ds1", model_preset="tiny", n_params=12_000_000, total_steps=10**5,
                                  device="cuda:0", precision="bf16"), run, t0 - 1)]
    mon = HealthMonitor()
    for t, m in trace.events:
        events.append(env(m, run, t))
        events += [env(a, run, t + 0.1) for a in mon.observe(run, m, t)]
    div = next(lab for lab in trace.incidents if lab.kind == "divergence")
    events.append(env(TrainerAction(action="rollback", reason="divergence <alert>", step=trace.events[div.end][1].step,
                                    details={"restored_step": div.detail["rollback_to"], "lr_factor": 0.5}),
                      run, trace.events[div.end][0] + 0.2))
    events.append(env(TrainingCompleted(final_step=trace.events[-1][1].step, tokens_seen=1, final_loss=2.0,
                                        final_checkpoint=REF, final_checkpoint_digest="d", wall_time_s=1.0),
                      run, trace.end_time + 1))
    return events


def _parse(html: str) -> ET.Element:
    assert html.startswith("<!DOCTYPE html>")
    return ET.fromstring(html.split("\n", 1)[1])  # the rest is well-formed XML


def test_report_is_valid_html_with_one_svg_per_plot_and_markers(run_events) -> None:
    html = render_report(run_events)
    root = _parse(html)
    svgs = root.findall(f".//{SVG}")
    assert len(svgs) == 5  # loss, LR, grad norm, throughput, per-domain loss
    titles = [s.get("aria-label") for s in svgs]
    assert titles == ["Loss", "Learning rate", "Gradient norm (before clipping)", "Throughput", "Loss per domain"]
    loss = svgs[0]
    classes = [g.get("class") for g in loss.iter("{http://www.w3.org/2000/svg}g")]
    assert "alert-marker" in classes and "rollback-marker" in classes and "nonfinite" in classes
    assert "legend" in classes
    texts = "".join(loss.itertext())
    assert "step" in texts and "train loss" in texts and "rollback" in texts
    domain_legend = "".join(svgs[4].itertext())
    assert all(d in domain_legend for d in ("web", "code", "books"))
    assert "run&lt;&amp;&gt;1" in html and "divergence &lt;alert&gt;" in html
    assert "non_finite" in html and "completed" in html


def test_report_of_nothing_is_still_a_page() -> None:
    root = _parse(render_report([]))
    assert "No run events" in "".join(root.itertext())


def test_nice_ticks_are_round_and_cover_the_range() -> None:
    ticks = nice_ticks(0.13, 9.7, 5)
    assert ticks[0] >= 0.13 and ticks[-1] <= 9.7 and len(ticks) >= 4
    assert all(math.isclose(t / 2, round(t / 2)) for t in ticks)


def test_watch_renders_the_run_with_its_alerts_and_actions(run_events) -> None:
    console = Console(record=True, width=140, color_system=None)
    console.print(render_watch(run_events))
    text = console.export_text()
    for needle in ("run run<&>1", "loss", "lr", "tokens/s", "grad norm", "divergence", "rollback",
                   "completed"):
        assert needle in text, needle


def test_watch_waits_politely_without_events() -> None:
    console = Console(record=True, width=80)
    console.print(render_watch([]))
    assert "waiting" in console.export_text()


def test_sparkline_shows_non_finite_values() -> None:
    line = sparkline([1.0, 2.0, float("nan"), 3.0])
    assert line.plain[2] == "×" and len(line.plain) == 4
    long = sparkline([float(i) for i in range(1000)] + [float("inf")], width=20)
    assert len(long.plain) == 20 and long.plain[-1] == "×"
