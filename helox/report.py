"""A self-contained HTML report of runs, built from their events alone.

`render_report(events)` draws, per run, inline SVG charts over steps: training and
validation loss, learning rate (log scale), gradient norm (log scale), throughput and
per-domain loss, each with the run's alert markers (HealthAlert, coloured by severity) and
rollback markers (TrainerAction 'rollback', where training was when it rolled back); loss
against learning rate; then tables of the alerts, the trainer's actions, the evaluations
(verdict and regression gates per checkpoint) and the exports.

No plotting library: the SVG is generated here, so the report opens anywhere and the
CLI needs nothing more. The output is well-formed XML apart from the doctype,
which keeps it easy to check and to post-process.

After a rollback the trainer logs earlier steps again; each line is drawn as segments
split where the step goes back, the abandoned ones faded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from html import escape
from typing import Any

from contracts.envelope import Envelope
from contracts.events import (
    EvaluationCompleted,
    HealthAlert,
    ModelReady,
    RunFailed,
    TrainerAction,
    TrainingCompleted,
    TrainingMetrics,
    TrainingStarted,
)

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
SEVERITY_COLOR = {"info": "#2b8cbe", "warning": "#e6a100", "critical": "#d62728"}
ROLLBACK_COLOR = "#6a3d9a"
_TICK = 'font-size="11" fill="#555"'
_LABEL = 'font-size="12" fill="#333"'
MAX_POINTS = 1500  # per line: beyond this, points are thinned evenly (markers never are)


# --- events -> run summaries -------------------------------------------------------------------


@dataclass
class RunView:
    """What a report (or the live view) needs of one run, in arrival order."""

    run_id: str
    metrics: list[tuple[datetime, TrainingMetrics]] = field(default_factory=list)
    alerts: list[tuple[datetime, HealthAlert]] = field(default_factory=list)
    actions: list[tuple[datetime, TrainerAction]] = field(default_factory=list)
    evaluations: list[tuple[datetime, EvaluationCompleted]] = field(default_factory=list)
    exports: list[tuple[datetime, ModelReady]] = field(default_factory=list)
    started: TrainingStarted | None = None
    completed: TrainingCompleted | None = None
    failed: RunFailed | None = None

    @property
    def status(self) -> str:
        if self.failed is not None:
            return "failed"
        if self.completed is not None:
            return "completed"
        return "running" if self.started is not None or self.metrics else "unknown"


def group_runs(events: Iterable[Envelope[Any]]) -> dict[str, RunView]:
    """Events -> one RunView per run_id, in order of first appearance (events sorted by time)."""
    runs: dict[str, RunView] = {}
    for env in sorted(events, key=lambda e: e.occurred_at):
        if env.run_id is None:
            continue
        view = runs.setdefault(env.run_id, RunView(env.run_id))
        p, at = env.payload, env.occurred_at
        if isinstance(p, TrainingMetrics):
            view.metrics.append((at, p))
        elif isinstance(p, HealthAlert):
            view.alerts.append((at, p))
        elif isinstance(p, TrainerAction):
            view.actions.append((at, p))
        elif isinstance(p, EvaluationCompleted):
            view.evaluations.append((at, p))
        elif isinstance(p, ModelReady):
            view.exports.append((at, p))
        elif isinstance(p, TrainingStarted):
            view.started = p
        elif isinstance(p, TrainingCompleted):
            view.completed = p
        elif isinstance(p, RunFailed):
            view.failed = p
    return runs


# --- SVG charts ----------------------------------------------------------------------------------


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]  # (step, value), arrival order; non-finite values allowed
    color: str
    dots: bool = False  # points (val_loss) instead of a line


@dataclass
class Marker:
    step: float
    label: str
    color: str
    css: str  # 'alert-marker' or 'rollback-marker'
    legend: str  # its legend entry, e.g. 'critical alert'
    dashed: bool = False


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values (1, 2, 5 x 10^k) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(0.0 if abs(t) < step * 1e-9 else t)
        t += step
    return ticks


def log_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Tick values for a log axis spanning 10**lo .. 10**hi: decades when it spans several,
    1-2-5 steps when it spans a few, and round linear steps inside one decade (a grad norm
    moving between 0.3 and 0.9 still gets 4-6 labelled ticks, not one)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    span = hi - lo
    if span > 3:
        every = max(1, math.ceil(span / n))
        return [10.0 ** k for k in range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1) if k % every == 0]
    ticks = [m * 10.0 ** k for k in range(math.floor(lo), math.ceil(hi) + 1) for m in (1.0, 2.0, 5.0)
             if lo - 1e-9 <= math.log10(m * 10.0 ** k) <= hi + 1e-9]
    if len(ticks) >= 3:
        return ticks
    return [t for t in nice_ticks(10.0 ** lo, 10.0 ** hi, n + 1) if t > 0]


def fmt(v: float) -> str:
    """Compact number for axes and tables: 1.2e-04, 3.5, 12k, 4.1M."""
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a != 0 and a < 1e-2:
        return f"{v:.1e}"
    return f"{v:.4g}"


def _segments(points: Sequence[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    """Split where the step goes back (a rollback): each segment is monotone in step."""
    segs: list[list[tuple[float, float]]] = [[]]
    last = -math.inf
    for x, y in points:
        if x < last and segs[-1]:
            segs.append([])
        segs[-1].append((x, y))
        last = x
    return [s for s in segs if s]


def _timeline(points: Sequence[tuple[float, float]]) -> list[tuple[list[tuple[float, float]], bool]]:
    """(part, abandoned) pieces: the steps of a segment that a later segment logged again
    (a rollback went back before them) are the abandoned timeline, drawn faded."""
    segs = _segments(points)
    out = []
    for k, seg in enumerate(segs):
        cut = min((later[0][0] for later in segs[k + 1:]), default=math.inf)
        kept = [p for p in seg if p[0] <= cut]
        gone = [p for p in seg if p[0] >= cut]
        if kept:
            out.append((kept, False))
        if gone:
            out.append(([kept[-1], *gone] if kept else gone, True))
    return out


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= MAX_POINTS:
        return points
    stride = len(points) / MAX_POINTS
    return [points[int(i * stride)] for i in range(MAX_POINTS)] + [points[-1]]


def line_chart(title: str, series: list[Series], *, y_label: str, x_label: str = "step", log_y: bool = False,
               log_x: bool = False, markers: Sequence[Marker] = (), width: int = 760, height: int = 260) -> str:
    """One chart as an inline <svg>: axes with ticks and labels, a legend, markers.

    Non-finite values are drawn as red crosses along the top edge (a NaN loss is news).
    """
    ml, mr, mt, mb = 64, 16, 28, 44
    pw, ph = width - ml - mr, height - mt - mb
    usable = [(x, y) for s in series for x, y in s.points
              if math.isfinite(y) and (y > 0 or not log_y) and (not log_x or (math.isfinite(x) and x > 0))]
    xs = [x for x, _ in usable] if log_x else [x for s in series for x, _ in s.points] + [m.step for m in markers]
    # Presentation attributes inline (not CSS), so that a chart copied out of the page renders the same.
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
              f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}" '
              f'font-family="DejaVu Sans, Helvetica, Arial, sans-serif">'),
             f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
             f'<text x="{ml}" y="18" font-size="13" font-weight="600" fill="#222">{escape(title)}</text>']
    if not xs or not usable:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" font-size="12" fill="#999">'
                     f'no data</text></svg>')
        return "".join(parts)
    if log_x:
        x0, x1 = math.log10(min(xs)), math.log10(max(xs))
        if x1 - x0 < 1e-9:
            x0, x1 = x0 - 0.5, x1 + 0.5
    else:
        x0, x1 = min(xs), max(xs)
        if x1 == x0:
            x0, x1 = x0 - 1, x1 + 1
    ys = [y for _, y in usable]
    if log_y:
        y0, y1 = math.log10(min(ys)), math.log10(max(ys))
        if y1 - y0 < 1e-9:
            y0, y1 = y0 - 0.5, y1 + 0.5
    else:
        y0, y1 = min(ys), max(ys)
        pad = (y1 - y0) * 0.05 or abs(y1) * 0.05 or 1.0
        y0, y1 = y0 - pad, y1 + pad

    def px(x: float) -> float:
        v = math.log10(x) if log_x else x
        return ml + (v - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        v = math.log10(y) if log_y else y
        return mt + ph - (v - y0) / (y1 - y0) * ph

    # Axes, grid and ticks.
    parts.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fcfcfc" stroke="#999"/>')
    for t in (log_ticks(x0, x1) if log_x else nice_ticks(x0, x1, 6)):
        X = px(t)
        parts.append(f'<line x1="{X:.1f}" y1="{mt}" x2="{X:.1f}" y2="{mt + ph}" stroke="#eee"/>'
                     f'<text x="{X:.1f}" y="{mt + ph + 16}" text-anchor="middle" {_TICK}>{fmt(t)}</text>')
    yticks = log_ticks(y0, y1) if log_y else nice_ticks(y0, y1, 5)
    for t in yticks:
        Y = py(t)
        parts.append(f'<line x1="{ml}" y1="{Y:.1f}" x2="{ml + pw}" y2="{Y:.1f}" stroke="#eee"/>'
                     f'<text x="{ml - 6}" y="{Y + 4:.1f}" text-anchor="end" {_TICK}>{fmt(t)}</text>')
    parts.append(f'<text x="{ml + pw / 2}" y="{height - 6}" text-anchor="middle" {_LABEL}>'
                 f'{escape(x_label)}{" (log)" if log_x else ""}</text>'
                 f'<text x="14" y="{mt + ph / 2}" text-anchor="middle" {_LABEL} '
                 f'transform="rotate(-90 14 {mt + ph / 2})">{escape(y_label)}{" (log)" if log_y else ""}</text>')

    # Markers under the data.
    for m in markers:
        X = px(m.step)
        dash = ' stroke-dasharray="5 3"' if m.dashed else ""
        parts.append(f'<g class="{m.css}"><title>{escape(m.label)}</title>'
                     f'<line x1="{X:.1f}" y1="{mt}" x2="{X:.1f}" y2="{mt + ph}" stroke="{m.color}" '
                     f'stroke-width="1.5"{dash}/>'
                     f'<path d="M{X - 4:.1f},{mt} L{X + 4:.1f},{mt} L{X:.1f},{mt + 7} Z" fill="{m.color}"/></g>')

    # Data.
    for s in series:
        for seg, faded in _timeline(s.points):
            opacity = ' opacity="0.3"' if faded else ""
            good = [(x, y) for x, y in _thin(seg)
                    if math.isfinite(y) and (y > 0 or not log_y) and (not log_x or (math.isfinite(x) and x > 0))]
            if s.dots:
                parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{s.color}"{opacity}/>'
                          for x, y in good]
            elif good:
                pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in good)
                parts.append(f'<polyline points="{pts}" fill="none" stroke="{s.color}" stroke-width="1.3"{opacity}/>')
            for x, y in seg:
                if not math.isfinite(y) and not (log_x and not (math.isfinite(x) and x > 0)):
                    X = px(x)
                    parts.append(f'<g class="nonfinite"><title>{escape(s.name)} = {y} at step {fmt(x)}</title>'
                                 f'<path d="M{X - 4:.1f},{mt + 2} L{X + 4:.1f},{mt + 10} M{X + 4:.1f},{mt + 2} '
                                 f'L{X - 4:.1f},{mt + 10}" stroke="#d62728" stroke-width="2"/></g>')

    # Legend (series, then marker kinds present).
    entries = [(s.name, s.color, "dot" if s.dots else "line") for s in series]
    for legend, color in dict.fromkeys((m.legend, m.color) for m in markers):
        entries.append((legend, color, "marker"))
    lx = ml + pw
    for name, color, kind in reversed(entries):
        lx -= 30 + 6.4 * len(name)
        if kind == "dot":
            sym = f'<circle cx="{lx + 6}" cy="14" r="3" fill="{color}"/>'
        elif kind == "marker":
            sym = f'<line x1="{lx + 6}" y1="7" x2="{lx + 6}" y2="20" stroke="{color}" stroke-width="2"/>'
        else:
            sym = f'<line x1="{lx}" y1="14" x2="{lx + 14}" y2="14" stroke="{color}" stroke-width="2"/>'
        parts.append(f'<g class="legend">{sym}<text x="{lx + 18}" y="18" {_TICK}>{escape(name)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


# --- the page ------------------------------------------------------------------------------------


def run_markers(view: RunView) -> list[Marker]:
    """Firing alerts (at step_start) and rollbacks (at the step they were applied)."""
    firing = sorted((a for _, a in view.alerts if a.state == "firing"),
                    key=lambda a: ("critical", "warning", "info").index(a.severity))
    out = [Marker(a.step_start, f"{a.severity} {a.kind} at step {a.step_start}: {a.message}",
                  SEVERITY_COLOR.get(a.severity, "#555"), "alert-marker", f"{a.severity} alert")
           for a in reversed(firing)]  # critical drawn last, on top
    for _, act in view.actions:
        if act.action == "rollback":
            # The action's step is the trainer's step once it was applied, i.e. the restored
            # one; the marker belongs where training was when it rolled back.
            restored = act.details.get("restored_step")
            at = act.details.get("from_step")
            at = at if isinstance(at, (int, float)) and not isinstance(at, bool) else act.step
            label = f"rollback at step {at}" + (f" to step {restored}" if restored is not None else "")
            out.append(Marker(at, f"{label}: {act.reason}", ROLLBACK_COLOR, "rollback-marker", "rollback",
                              dashed=True))
    return out


def run_charts(view: RunView) -> list[str]:
    ms = [m for _, m in view.metrics]
    markers = run_markers(view)
    val = [(m.step, m.val_loss) for m in ms if m.val_loss is not None]
    charts = [
        line_chart("Loss", [Series("train loss", [(m.step, m.loss) for m in ms], PALETTE[0])]
                   + ([Series("val loss", val, PALETTE[1], dots=True)] if val else []),
                   y_label="loss", markers=markers),
        # Log scale: an LR fault of x100 would otherwise flatten the schedule into the axis.
        line_chart("Learning rate", [Series("lr", [(m.step, m.lr) for m in ms], PALETTE[2])],
                   y_label="learning rate", log_y=True, markers=markers),
        line_chart("Gradient norm (before clipping)", [Series("grad norm", [(m.step, m.grad_norm) for m in ms],
                                                              PALETTE[3])],
                   y_label="grad norm", log_y=True, markers=markers),
        line_chart("Throughput", [Series("tokens/s", [(m.step, m.tokens_per_s) for m in ms], PALETTE[4])],
                   y_label="tokens / s", markers=markers),
    ]
    charts.append(line_chart(
        "Loss vs learning rate", [Series("train loss", [(m.lr, m.loss) for m in ms], PALETTE[0], dots=True)],
        y_label="loss", x_label="learning rate", log_x=True))
    domains = sorted({d for m in ms for d in m.domain_loss})
    charts.append(line_chart(
        "Loss per domain",
        [Series(d, [(m.step, m.domain_loss[d]) for m in ms if d in m.domain_loss], PALETTE[(i + 5) % len(PALETTE)])
         for i, d in enumerate(domains)],
        y_label="loss", markers=markers))
    return charts


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], css: str) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _summary(view: RunView) -> str:
    ms = [m for _, m in view.metrics]
    last = ms[-1] if ms else None
    facts: list[tuple[str, str]] = [("status", view.status)]
    if view.started is not None:
        s = view.started
        facts += [("model", f"{s.model_preset} ({fmt(s.n_params)} params)"), ("precision", s.precision),
                  ("device", f"{s.device} x{s.world_size}"), ("planned steps", str(s.total_steps)),
                  ("dataset", s.dataset_version)]
    if last is not None:
        facts += [("last step", str(last.step)), ("tokens seen", fmt(last.tokens_seen)), ("last loss", fmt(last.loss))]
    vals = [m.val_loss for m in ms if m.val_loss is not None and math.isfinite(m.val_loss)]
    if vals:
        facts.append(("best val loss", fmt(min(vals))))
    firing = [a for _, a in view.alerts if a.state == "firing"]
    facts += [("alerts", str(len(firing))),
              ("rollbacks", str(sum(1 for _, a in view.actions if a.action == "rollback")))]
    if view.failed is not None:
        facts.append(("failure", f"{view.failed.stage}: {view.failed.reason}"))
    return '<dl class="facts">' + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in facts) + "</dl>"


def _alerts_table(view: RunView) -> str:
    if not view.alerts:
        return "<p>No alerts.</p>"
    rows = []
    for at, a in view.alerts:
        ev = a.evidence
        rows.append([escape(at.strftime("%Y-%m-%d %H:%M:%S")),
                     f'<span class="sev-{escape(a.severity)}">{escape(a.severity)}</span>',
                     escape(a.state), escape(a.kind), escape(ev.layer or ""), f"{a.step_start}&#8211;{a.step_end}",
                     escape(f"{ev.statistic} = {fmt(ev.value)} (threshold {fmt(ev.threshold)})"),
                     escape(a.recommended_action), escape(a.message)])
    return _table(["time (UTC)", "severity", "state", "kind", "layer", "steps", "evidence", "action", "message"],
                  rows, "alerts")


def _actions_table(view: RunView) -> str:
    if not view.actions:
        return "<p>No trainer actions.</p>"
    rows = [[escape(at.strftime("%Y-%m-%d %H:%M:%S")), escape(a.action), str(a.step),
             escape(", ".join(f"{k}={v}" for k, v in a.details.items())), escape(a.reason)]
            for at, a in view.actions]
    return _table(["time (UTC)", "action", "step", "details", "reason"], rows, "actions")


def _evaluations_table(view: RunView) -> str:
    if not view.evaluations:
        return "<p>No evaluations.</p>"
    rows = []
    rag = any(e.retrieval for _, e in view.evaluations)
    for _at, e in sorted(view.evaluations, key=lambda p: p[1].step):
        headline = ", ".join(f"{k} {fmt(v)}" for k, v in sorted(e.metrics.items()))
        gates = "; ".join(f'{"pass" if g.passed else "FAIL"} {g.name}' + (f" ({g.detail})" if g.detail else "")
                          for g in e.gates)
        rows.append([str(e.step), f'<span class="verdict-{escape(e.verdict)}">{escape(e.verdict)}</span>',
                     escape(headline), *([escape(_retrieval_cell(e.retrieval))] if rag else []),
                     escape(gates or "no gates"), escape(e.checkpoint_digest[:12])])
    # The retrieval-gain column only for a run trained with retrieved context (some evaluation has it).
    return _table(["step", "verdict", "metrics", *(["retrieval gain (nats/token)"] if rag else []),
                   "regression gates", "checkpoint"], rows, "evaluations")


def _retrieval_cell(r: dict[str, float] | None) -> str:
    """Retrieval gain vs the random-context control (runs trained with retrieved context)."""
    if not r:
        return "-"
    return (f"{fmt(r['gain'])} vs control {fmt(r['control_gain'])} (bits/byte {fmt(r['gain_bpb'])} vs "
            f"{fmt(r['control_gain_bpb'])}; loss without {fmt(r['loss_without'])}, with {fmt(r['loss_with'])}, "
            f"random {fmt(r['loss_random'])})")


def _exports_table(view: RunView) -> str:
    if not view.exports:
        return "<p>No exports.</p>"
    rows = [[escape(m.model_id), escape(", ".join(sorted(m.formats))), escape(m.fingerprint[:16]),
             escape(m.lineage.checkpoint_digest[:12]),
             escape(", ".join(f"{k} {fmt(v)}" for k, v in sorted(m.metrics.items())))]
            for _, m in view.exports]
    return _table(["model", "formats", "fingerprint", "checkpoint", "metrics"], rows, "exports")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1600px}
h1{font-size:22px}h2{font-size:18px;margin-top:36px;border-bottom:1px solid #ddd}h3{font-size:15px}
.charts{display:flex;flex-wrap:wrap;gap:12px}
svg.chart{border:1px solid #e3e3e3;border-radius:4px}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:2px 16px}dl.facts dt{color:#666}dl.facts dd{margin:0}
table{border-collapse:collapse;font-size:12px;margin:8px 0}th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;
vertical-align:top}th{background:#f4f4f4}
.verdict-regression,.verdict-error{color:#d62728;font-weight:600}.verdict-pass{color:#2ca02c}
.sev-critical{color:#d62728;font-weight:600}.sev-warning{color:#b07d00;font-weight:600}.sev-info{color:#2b8cbe}
"""


def render_report(events: list[Envelope[Any]], title: str = "Helox training report") -> str:
    """An HTML page for the runs in `events` (metrics, alerts, actions, lifecycle)."""
    runs = group_runs(events)
    body = [f"<h1>{escape(title)}</h1>"]
    if not runs:
        body.append("<p>No run events.</p>")
    for view in runs.values():
        body.append(f'<section class="run" id="run-{escape(view.run_id)}"><h2>Run {escape(view.run_id)}</h2>')
        body.append(_summary(view))
        body.append('<div class="charts">' + "".join(run_charts(view)) + "</div>")
        body.append("<h3>Alerts</h3>" + _alerts_table(view))
        body.append("<h3>Trainer actions</h3>" + _actions_table(view))
        body.append("<h3>Evaluations</h3>" + _evaluations_table(view))
        body.append("<h3>Exports</h3>" + _exports_table(view))
        body.append("</section>")
    return ("<!DOCTYPE html>\n"
            f'<html lang="en"><head><meta charset="utf-8"/><title>{escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")
