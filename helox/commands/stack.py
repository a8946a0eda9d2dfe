"""`helox up` and `helox status`: the local stack and what runs on Synapse."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from shared.bus import admin

from .. import common
from ..common import console
from ..errors import CliError
from ..pending import over_delivered
from ..stack import SERVICES, LocalStack, default_cyrex_collection


def up(
    evaluators: Annotated[int, typer.Option(min=1, max=32, help="Evaluator instances (one consumer group).")] = 1,
    services: Annotated[str, typer.Option(help="Comma-separated services to start.")] = ",".join(SERVICES),
    config: Annotated[Path | None, typer.Option(help="YAML file with a `settings:` section.")] = None,
    with_cyrex: Annotated[bool, typer.Option(
        "--with-cyrex", help="Also run the reference Cyrex (`python -m cyrex_example serve`): retrieval for "
        "RAG runs and an answer from every published model.")] = False,
    cyrex_collection: Annotated[Path | None, typer.Option(
        help="Documents Cyrex indexes (.txt/.md/.py/.jsonl under it); default: the Python standard "
        "library, the demo's corpus.")] = None,
    cyrex_ready_timeout: Annotated[float | None, typer.Option(
        help="Seconds to wait for Cyrex to index its collection and heart-beat `ready` before the stack "
        "reports up (default: HELOX_CYREX_READY_TIMEOUT_S, else 600).")] = None,
) -> None:
    """Start Redis (embedded unless HELOX_REDIS_URL is set) and the services; Ctrl-C stops all.
    With --with-cyrex the stack is up once Cyrex has indexed its collection."""
    settings = common.settings(config)
    if cyrex_collection is not None and not with_cyrex:
        raise CliError("--cyrex-collection needs --with-cyrex")
    if cyrex_ready_timeout is not None and not with_cyrex:
        raise CliError("--cyrex-ready-timeout needs --with-cyrex")
    try:
        stack = LocalStack(settings, evaluators=evaluators, config_path=config,
                           services=[s.strip() for s in services.split(",") if s.strip()],
                           cyrex_collection=(cyrex_collection or default_cyrex_collection()) if with_cyrex else None,
                           cyrex_ready_timeout_s=cyrex_ready_timeout)
    except ValueError as exc:  # an unknown service name, a missing Cyrex collection
        raise CliError(str(exc)) from None
    common.stop_on_signals()
    try:
        stack.start()  # with Cyrex: returns once it is ready (CyrexNotReadyError, one line, if never)
    except KeyboardInterrupt:
        console.print("[green]stack stopped[/green] (before it was up)")
        return
    console.print(f"[green]stack up[/green]: redis {stack.redis_url}; logs in {stack.log_dir}")
    for slot in stack.slots:
        console.print(f"  {slot.instance:<20} pid {slot.proc.pid if slot.proc else '-'}")
    if stack.cyrex_ready is not None:
        hb = stack.cyrex_ready
        console.print(f"  cyrex ready: {hb.index_chunks} chunks of {hb.index_documents} documents "
                      f"(index {hb.index_digest[:12]}…)", highlight=False)
    try:
        while True:
            for line in stack.supervise_once():
                console.print(f"[yellow]{line}[/yellow]")
            time.sleep(0.5)
    except KeyboardInterrupt:
        console.print("stopping…")
    finally:
        stack.stop()
        console.print("[green]stack stopped[/green]")


def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Live instances (from heartbeats), stream lengths, pending per group, dead letters."""
    settings = common.settings()
    client = common.client(settings)
    instances = admin.live_instances(client, settings.topic_prefix)
    streams = admin.stream_states(client, settings.topic_prefix)
    dlq_len = next(s.length for s in streams if s.topic == "dlq")
    stuck = over_delivered(client, streams, settings.max_deliveries)
    if as_json:
        print(json.dumps({
            "instances": [i.__dict__ for i in instances],
            "streams": [{**s.__dict__, "groups": [g.__dict__ for g in s.groups]} for s in streams],
            "dead_letters": dlq_len,
            "max_deliveries": settings.max_deliveries,
            "over_delivered": [e.__dict__ for e in stuck],
        }, default=str))
        return
    table = Table(title="Instances")
    for col in ("service", "instance", "status", "work", "last beat", "host/pid"):
        table.add_column(col)
    for i in instances:
        colour = "green" if i.alive else "red"
        table.add_row(i.service, i.instance, f"[{colour}]{i.status if i.alive else 'dead'}[/{colour}]",
                      i.current_work or "", f"{i.age_s:.1f}s", f"{i.host}/{i.pid}")
    console.print(table)
    st = Table(title="Streams")
    for col in ("topic", "length", "retention", "group", "consumers", "pending", "lag"):
        st.add_column(col)
    for s in streams:
        if not s.groups:
            st.add_row(s.topic, str(s.length), s.retention, "", "", "", "")
        for g in s.groups:
            st.add_row(s.topic, str(s.length), s.retention, g.name, str(g.consumers), str(g.pending),
                       "" if g.lag is None else str(g.lag))
    console.print(st)
    console.print(f"dead letters: [{'red' if dlq_len else 'green'}]{dlq_len}[/]")
    if stuck:
        over = Table(title=f"[red]Delivered more than max_deliveries={settings.max_deliveries} times[/red]")
        for col in ("topic", "group", "entry", "consumer", "deliveries", "idle"):
            over.add_column(col)
        for e in stuck:
            over.add_row(e.topic, e.group, e.entry_id, e.consumer, str(e.deliveries), f"{e.idle_ms / 1000:.1f}s")
        console.print(over)
    console.print(f"over-delivered entries: [{'red' if stuck else 'green'}]{len(stuck)}[/]")
