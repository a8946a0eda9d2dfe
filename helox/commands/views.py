"""`helox watch` and `helox report`: a run seen from its events."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated, Any

import redis
import typer

from contracts import TOPICS, Envelope, ModelReady, RunFailed, TrainingCompleted
from shared.bus import admin
from shared.config import HeloxSettings

from .. import common
from ..common import console


def run_events(client: redis.Redis, prefix: str, run_id: str) -> list[Envelope[Any]]:
    """Every event of RUN_ID on the bus (heartbeats and dead letters aside), oldest first."""
    events = []
    for key, t in TOPICS.items():
        if key in ("services.heartbeat", "dlq"):
            continue
        for _id, fields in client.xrange(t.stream(prefix)):
            env = admin.decode_entry(fields)
            if env is not None and env.run_id == run_id:
                events.append(env)
    return sorted(events, key=lambda e: e.occurred_at)


def watch(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    once: Annotated[bool, typer.Option(help="Render once and exit.")] = False,
    refresh: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 1.0,
) -> None:
    """A live view of a run: loss and LR sparklines, throughput, grad norm, alerts and actions."""
    from ..watch import render_watch

    settings = common.settings()
    with common.reading(settings) as client:
        if once:
            console.print(render_watch(run_events(client, settings.topic_prefix, run_id), run_id=run_id))
            return
        _watch_live(client, settings, run_id, refresh)


def _watch_live(client: redis.Redis, settings: HeloxSettings, run_id: str, refresh: float) -> None:
    from rich.live import Live

    from ..watch import render_watch

    with Live(console=console, refresh_per_second=4) as live, contextlib.suppress(KeyboardInterrupt):
        while True:
            events = run_events(client, settings.topic_prefix, run_id)
            live.update(render_watch(events, run_id=run_id))
            if any(isinstance(e.payload, (TrainingCompleted, RunFailed, ModelReady)) for e in events[-5:]):
                break
            time.sleep(refresh)


def report(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    out: Annotated[Path | None, typer.Option(help="HTML file (default: <artifacts>/reports/<run>.html).")] = None,
) -> None:
    """Write an HTML report of a run (plots of loss, LR, grad norm, throughput, alerts, rollbacks) from its events."""
    from shared.artifacts import ArtifactStore, atomic_write_bytes

    from ..report import render_report

    settings = common.settings()
    with common.reading(settings) as client:
        events = run_events(client, settings.topic_prefix, run_id)
    if not events:
        common.err.print(f"[red]error:[/red] no events for run {run_id!r}", soft_wrap=True)
        raise typer.Exit(1)
    path = out or ArtifactStore(settings.artifacts).path("reports", f"{run_id}.html")
    atomic_write_bytes(path, render_report(events, title=f"Helox run {run_id}").encode())
    console.print(f"report: {path}")
