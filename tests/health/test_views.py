"""The HTML report and the live terminal view, built from events alone."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest
from rich.console import Console

from contracts import (
    EvaluationCompleted,
    GateResult,
    Lineage,
    ModelReady,
    TrainerAction,
    TrainingCompleted,
    TrainingStarted,
)
from contracts.envelope import ArtifactRef
from helox.report import log_ticks, nice_ticks, render_report
from helox.watch import render_watch, sparkline
from services.health_monitor.monitor import HealthMonitor
from tests.health.traces import make_trace

from .helpers import env, metrics

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
    assert len(svgs) == 6  # loss, LR, grad norm, throughput, loss vs LR, per-domain loss
    titles = [s.get("aria-label") for s in svgs]
    assert titles == ["Loss", "Learning rate", "Gradient norm (before clipping)", "Throughput",
                      "Loss vs learning rate", "Loss per domain"]
    loss = svgs[0]
    classes = [g.get("class") for g in loss.iter("{http://www.w3.org/2000/svg}g")]
    assert "alert-marker" in classes and "rollback-marker" in classes and "nonfinite" in classes
    assert "legend" in classes
    texts = "".join(loss.itertext())
    assert "step" in texts and "train loss" in texts and "rollback" in texts
    domain_legend = "".join(svgs[5].itertext())
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


# --- the charts' scales and markers, checked against positions worked out by hand --------------
# A chart is 760 x 260 with margins left 64, right 16, top 28, bottom 44: the plot area is
# x 64..744 (680 px) and y 28..216 (188 px).

SVG_NS = "{http://www.w3.org/2000/svg}"


def _chart(html: str, title: str) -> ET.Element:
    return next(s for s in _parse(html).iter(f"{SVG_NS}svg") if s.get("aria-label") == title)


def _polyline_ys(svg: ET.Element) -> list[float]:
    line = next(svg.iter(f"{SVG_NS}polyline"))
    return [float(p.split(",")[1]) for p in line.get("points").split()]


def test_the_lr_chart_is_logarithmic_so_an_lr_fault_does_not_flatten_the_schedule() -> None:
    # Schedule 1e-3 -> 1e-4 over steps 0..99, then a x100 fault (1e-1) for 10 steps.
    lrs = [1e-3 - 9e-4 * i / 99 for i in range(100)] + [1e-1] * 10
    events = [env(metrics(i, lr=lr), "r", float(i)) for i, lr in enumerate(lrs)]
    ys = _polyline_ys(_chart(render_report(events), "Learning rate"))
    # Log axis from 1e-4 to 1e-1: the schedule's decade is a third of the 188 px plot height
    # (62.7 px); a linear axis would give it (1e-3 - 1e-4) / (1e-1 - 1e-4) * 188 = 1.7 px.
    schedule = ys[:100]
    assert max(schedule) - min(schedule) == pytest.approx(188 / 3, abs=0.5)
    assert min(ys) == pytest.approx(28.0, abs=0.1)  # the fault's 1e-1 at the top


def test_a_log_axis_within_one_decade_still_gets_several_ticks() -> None:
    # A grad norm between 0.3 and 0.9: 1-2-5 decade ticks would leave only 0.5.
    assert log_ticks(math.log10(0.3), math.log10(0.9)) == pytest.approx([0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert log_ticks(math.log10(0.05), math.log10(3.0)) == pytest.approx([0.05, 0.1, 0.2, 0.5, 1.0, 2.0])
    assert log_ticks(-8.0, 2.0) == pytest.approx([1e-8, 1e-6, 1e-4, 1e-2, 1.0, 1e2])
    events = [env(metrics(i, grad_norm=0.3 + 0.6 * i / 20), "r", float(i)) for i in range(21)]
    svg = _chart(render_report(events), "Gradient norm (before clipping)")
    labels = [t.text for t in svg.iter(f"{SVG_NS}text") if t.get("text-anchor") == "end"]
    assert labels == ["0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]


def test_a_rollback_marker_stands_where_training_was_when_it_rolled_back() -> None:
    events = [env(metrics(i), "r", float(i)) for i in range(0, 201, 10)]
    # The trainer reports the action at its step after the restore (100); it rolled back at 150.
    events.append(env(TrainerAction(action="rollback", reason="divergence", step=100,
                                    details={"from_step": 150, "restored_step": 100}), "r", 30.0))
    svg = _chart(render_report(events), "Loss")
    marker = next(g for g in svg.iter(f"{SVG_NS}g") if g.get("class") == "rollback-marker")
    assert marker.find(f"{SVG_NS}title").text.startswith("rollback at step 150 to step 100")
    # Steps 0..200 over 680 px from x=64: step 150 is at 64 + 150 / 200 * 680 = 574.
    assert float(marker.find(f"{SVG_NS}line").get("x1")) == pytest.approx(574.0)


def test_loss_against_learning_rate_puts_each_interval_at_its_lr() -> None:
    events = [env(metrics(i, loss=loss, lr=lr), "r", float(i)) for i, (lr, loss) in
              enumerate([(1e-4, 4.0), (1e-3, 3.0), (1e-2, 5.0)])]
    svg = _chart(render_report(events), "Loss vs learning rate")
    dots = [(float(c.get("cx")), float(c.get("cy"))) for c in svg.iter(f"{SVG_NS}circle")
            if c.get("r") == "2.5"]
    # log10(lr) -4, -3, -2 spread over 680 px: x = 64, 404, 744; loss 3..5 padded by 5%
    # (2.9..5.1 over 188 px): y(4) = 28 + 188 * (5.1 - 4) / 2.2 = 122.
    assert [x for x, _ in dots] == pytest.approx([64.0, 404.0, 744.0])
    assert dots[0][1] == pytest.approx(122.0, abs=0.1)


def test_the_report_has_the_evaluations_with_their_gates_and_the_exports() -> None:
    ref = ArtifactRef(uri="file:///a/x", sha256="a" * 64, size_bytes=1)
    events = [env(metrics(10), "r", 1.0),
              env(EvaluationCompleted(checkpoint=ref, checkpoint_digest="c" * 64, step=10,
                                      metrics={"val_loss": 3.25}, verdict="pass", gates_passed=True,
                                      gates=[GateResult(name="val_ppl_regression", passed=True)]), "r", 2.0),
              env(EvaluationCompleted(checkpoint=ref, checkpoint_digest="d" * 64, step=20,
                                      metrics={"val_loss": 3.5}, verdict="regression", gates_passed=False,
                                      gates=[GateResult(name="val_ppl_regression", passed=False,
                                                        detail="+7.9% [3.1%, 12.4%]")]), "r", 3.0),
              env(ModelReady(model_id="helox-r-abc", formats={"onnx": ref, "gguf": ref}, manifest=ref,
                             fingerprint="f" * 64, signature="s", metrics={"val_loss": 3.25},
                             lineage=Lineage(run_id="r", dataset_version="ds", checkpoint_digest="c" * 64, checkpoint_step=10,
                                             config_hash="h", code_version="v")), "r", 4.0)]
    root = _parse(render_report(events))
    tables = {t.get("class"): t for t in root.iter("table")}
    rows = [["".join(td.itertext()) for td in tr.iter("td")] for tr in tables["evaluations"].iter("tr")][1:]
    assert rows == [["10", "pass", "val_loss 3.25", "pass val_ppl_regression", "c" * 12],
                    ["20", "regression", "val_loss 3.5", "FAIL val_ppl_regression (+7.9% [3.1%, 12.4%])", "d" * 12]]
    export_rows = [["".join(td.itertext()) for td in tr.iter("td")] for tr in tables["exports"].iter("tr")][1:]
    assert export_rows == [["helox-r-abc", "gguf, onnx", "f" * 16, "c" * 12, "val_loss 3.25"]]
