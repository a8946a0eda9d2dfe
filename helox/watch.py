"""A live terminal view of runs: a pure function from recent events to a rich renderable.

`render_watch(events)` shows, per run: status and position, sparklines of loss, learning
rate, throughput and grad norm (latest, min and max beside each), and the most recent
alerts and trainer actions. The caller owns the loop (e.g. `rich.live.Live` refreshed with
the events read from the bus); nothing here does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from contracts.envelope import Envelope

from .report import RunView, fmt, group_runs

BLOCKS = "▁▂▃▄▅▆▇█"
SEVERITY_STYLE = {"info": "cyan", "warning": "yellow", "critical": "bold red"}
STATUS_STYLE = {"running": "green", "completed": "blue", "failed": "bold red", "unknown": "dim"}


def _bucket(values: list[float]) -> float:
    """A bucket's mean, or its first non-finite value: a NaN must not average away."""
    bad = [v for v in values if not math.isfinite(v)]
    return bad[0] if bad else sum(values) / len(values)


def sparkline(values: Sequence[float], width: int = 48, log: bool = False) -> Text:
    """Values as one line of block characters; the last `width` values (bucketed when more)."""
    vals = list(values)
    if len(vals) > width:
        size = len(vals) / width
        vals = [_bucket(vals[int(i * size):int((i + 1) * size)] or [vals[-1]]) for i in range(width)]
    finite = [v for v in vals if math.isfinite(v) and (v > 0 or not log)]
    text = Text()
    if not finite:
        return text.append("·" * len(vals), style="dim")
    tr = (lambda v: math.log10(v)) if log else (lambda v: v)
    lo, hi = tr(min(finite)), tr(max(finite))
    span = hi - lo
    for v in vals:
        if not math.isfinite(v) or (log and v <= 0):
            text.append("×", style="bold red")
            continue
        k = 0 if span <= 0 else int((tr(v) - lo) / span * (len(BLOCKS) - 1) + 0.5)
        text.append(BLOCKS[k])
    return text


def _series_row(table: Table, name: str, values: list[float], *, log: bool = False, width: int = 48) -> None:
    finite = [v for v in values if math.isfinite(v)]
    latest = values[-1] if values else math.nan
    table.add_row(name, sparkline(values[-width * 4:], width, log),
                  Text(fmt(latest), style="bold red" if not math.isfinite(latest) else ""),
                  fmt(min(finite)) if finite else "-", fmt(max(finite)) if finite else "-")


def run_panel(view: RunView, *, n_alerts: int = 6, n_actions: int = 6, width: int = 48) -> Panel:
    """One run's panel."""
    ms = [m for _, m in view.metrics]
    last = ms[-1] if ms else None
    head = Text()
    head.append(view.status, style=STATUS_STYLE.get(view.status, ""))
    if view.started is not None:
        s = view.started
        head.append(f"  {s.model_preset} · {s.precision} · {s.device} x{s.world_size}")
        if last is not None:
            head.append(f"  step {last.step}/{s.total_steps} ({last.step / s.total_steps:.0%})")
    elif last is not None:
        head.append(f"  step {last.step}")
    if last is not None:
        head.append(f"  tokens {fmt(last.tokens_seen)}")
        if last.mfu is not None:
            head.append(f"  MFU {last.mfu:.1%}")
        if last.loss_scale is not None:
            head.append(f"  loss scale {fmt(last.loss_scale)}")
    open_alerts = _open_incidents(view)
    if open_alerts:
        head.append(f"  {len(open_alerts)} open incident(s)", style="bold red")

    series = Table.grid(padding=(0, 2))
    for col in ("metric", "trend", "latest", "min", "max"):
        series.add_column(col, justify="right" if col in ("latest", "min", "max") else "left")
    _series_row(series, "loss", [m.loss for m in ms], width=width)
    vals = [m.val_loss for m in ms if m.val_loss is not None]
    if vals:
        _series_row(series, "val loss", vals, width=width)
    _series_row(series, "lr", [m.lr for m in ms], width=width)
    _series_row(series, "tokens/s", [m.tokens_per_s for m in ms], width=width)
    _series_row(series, "grad norm", [m.grad_norm for m in ms], log=True, width=width)

    alerts = Table(title="recent alerts", title_justify="left", expand=True, show_edge=False, pad_edge=False)
    for col in ("state", "kind", "severity", "steps", "action", "message"):
        alerts.add_column(col, overflow="fold", ratio=4 if col == "message" else None)
    for _, a in view.alerts[-n_alerts:]:
        style = SEVERITY_STYLE.get(a.severity, "") if a.state == "firing" else "dim"
        kind = a.kind + (f" [{a.evidence.layer}]" if a.evidence.layer else "")
        alerts.add_row(a.state, kind, Text(a.severity, style=style), f"{a.step_start}-{a.step_end}",
                       a.recommended_action, a.message, style="dim" if a.state == "resolved" else None)

    actions = Table(title="recent trainer actions", title_justify="left", expand=True, show_edge=False, pad_edge=False)
    for col in ("action", "step", "details", "reason"):
        actions.add_column(col, overflow="fold", ratio=4 if col == "reason" else None)
    for _, act in view.actions[-n_actions:]:
        actions.add_row(Text(act.action, style="magenta" if act.action == "rollback" else ""), str(act.step),
                        ", ".join(f"{k}={v}" for k, v in act.details.items()), act.reason)

    parts: list[RenderableType] = [head, series]
    parts.append(alerts if view.alerts else Text("no alerts", style="dim"))
    parts.append(actions if view.actions else Text("no trainer actions", style="dim"))
    border = "red" if open_alerts else STATUS_STYLE.get(view.status, "white").split()[-1]
    return Panel(Group(*parts), title=f"run {view.run_id}", title_align="left", border_style=border)


def _open_incidents(view: RunView) -> set[str]:
    state: dict[str, str] = {}
    for _, a in view.alerts:
        state[a.incident_id] = a.state
    return {i for i, s in state.items() if s == "firing"}


def render_watch(events: list[Envelope[Any]], *, run_id: str | None = None, max_runs: int = 3,
                 width: int = 48) -> RenderableType:
    """The live view of the runs in `events` (the most recent `max_runs`, or just `run_id`)."""
    runs = group_runs(events)
    if run_id is not None:
        runs = {run_id: runs[run_id]} if run_id in runs else {}
    if not runs:
        return Panel(Text("waiting for training events…", style="dim"), title="helox watch")
    views = list(runs.values())[-max_runs:]
    return Group(*(run_panel(v, width=width) for v in views))
