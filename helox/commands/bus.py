"""`helox events tail`, `helox dlq list|replay`, `helox command`: Synapse, read and written."""

from __future__ import annotations

import contextlib
import getpass
import json
import socket
import time
from datetime import UTC
from typing import Annotated

import typer
from rich.table import Table

from contracts import TOPICS, RunCancelled, TrainerCommand, topic, topic_for
from contracts.codec import envelope
from shared.bus import admin
from shared.bus.wire import encode_entry

from .. import common
from ..common import CLI_PRODUCER, console, err
from ..errors import CliError
from ..events import describe, follow


def events_tail(
    topic_key: Annotated[str | None, typer.Option("--topic", help="Topic key, e.g. train.metrics.")] = None,
    run: Annotated[str | None, typer.Option(help="Only events of this run id.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON envelope per line.")] = False,
    from_start: Annotated[bool, typer.Option("--from-start", help="Replay the stream history first.")] = False,
    count: Annotated[int | None, typer.Option(help="Stop after this many events.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
) -> None:
    """Follow events as they happen (Ctrl-C to stop)."""
    settings = common.settings()
    client = common.client(settings)
    try:
        keys = [topic(topic_key).key] if topic_key else list(TOPICS)
    except KeyError as exc:
        raise CliError(exc.args[0]) from None
    streams = [TOPICS[k].stream(settings.topic_prefix) for k in keys]
    seen = 0
    deadline = time.monotonic() + timeout if timeout else None
    with contextlib.suppress(KeyboardInterrupt):
        for stream, entry_id, env, _fields in follow(client, streams, start="0-0" if from_start else "$",
                                                        notice=common.notice):
            if deadline and time.monotonic() > deadline:
                break
            if not stream:
                continue
            if env is None:
                if not run:
                    err.print(f"[red]{stream} {entry_id}: not a valid Helox event[/red]")
                continue
            if run and env.run_id != run:
                continue
            if as_json:
                print(env.model_dump_json(), flush=True)
            else:
                ts = env.occurred_at.astimezone(UTC).strftime("%H:%M:%S")
                console.print(f"{ts} [cyan]{stream.removeprefix(settings.topic_prefix):<22}[/cyan] "
                              f"{env.run_id or '-':<18} {describe(env)}", highlight=False)
            seen += 1
            if count and seen >= count:
                break


def dlq_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List dead letters with their error."""
    settings = common.settings()
    letters = admin.dead_letters(common.client(settings), settings.topic_prefix, count=10_000)
    if as_json:
        for entry_id, letter, _env in letters:
            print(json.dumps({"id": entry_id, **letter.model_dump(mode="json")}))
        return
    table = Table(title=f"Dead letters ({len(letters)})")
    for col in ("id", "stream", "error type", "error", "group/consumer", "deliveries"):
        table.add_column(col)
    for entry_id, letter, _env in letters:
        table.add_row(entry_id, letter.original_stream, letter.error_type, letter.error[:80],
                      f"{letter.group}/{letter.consumer}", str(letter.delivery_count))
    console.print(table)


def dlq_replay(
    ids: Annotated[list[str] | None, typer.Argument(help="Dead-letter ids (from `helox dlq list`).")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
) -> None:
    """Put dead letters back on their original stream (after fixing the cause)."""
    settings = common.settings()
    client = common.client(settings)
    targets = ids or []
    if replay_all:
        targets = [i for i, _l, _e in admin.dead_letters(client, settings.topic_prefix, count=100_000)]
    if not targets:
        raise CliError("nothing to replay: give ids or --all")
    for entry_id in targets:
        try:
            new_id = admin.replay_dead_letter(client, settings.topic_prefix, entry_id)
        except (KeyError, ValueError) as exc:
            err.print(f"[red]{entry_id}: {exc}[/red]")
            raise typer.Exit(1) from exc
        console.print(f"{entry_id} -> replayed as {new_id}")


def command(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    what: Annotated[str, typer.Argument(help="pause|resume|checkpoint|stop|rollback|scale_lr|skip_data")],
    value: Annotated[float | None, typer.Option(help="Argument, e.g. LR factor.")] = None,
    reason: Annotated[str, typer.Option()] = "operator command",
) -> None:
    """Send a TrainerCommand to the trainer running RUN_ID."""
    settings = common.settings()
    client = common.client(settings)
    try:
        payload = TrainerCommand(command=what, value=value, reason=reason)  # type: ignore[arg-type]
    except ValueError as exc:
        raise CliError(f"bad command {what!r}: {exc}") from exc
    env = envelope(payload, producer=CLI_PRODUCER, run_id=run_id)
    client.xadd(topic_for(TrainerCommand).stream(settings.topic_prefix), encode_entry(env))
    console.print(f"sent {what} to {run_id} ({env.event_id})")


def cancel(
    run_id: Annotated[str, typer.Argument(help="Run id (as `helox run` printed it).")],
    reason: Annotated[str, typer.Option(help="Why, recorded in the event.")] = "cancelled by an operator",
) -> None:
    """Cancel RUN_ID: every service stops its work for the run and skips its later events
    (data-prep abandons the dataset, the trainer checkpoints and stops, nothing more is
    evaluated or exported); the stage at work ends the run with RunFailed (Cancelled)."""
    settings = common.settings()
    client = common.client(settings)
    env = envelope(RunCancelled(reason=reason, requested_by=f"{getpass.getuser()}@{socket.gethostname()}"),
                   producer=CLI_PRODUCER, run_id=run_id)
    client.xadd(topic_for(RunCancelled).stream(settings.topic_prefix), encode_entry(env))
    console.print(f"cancelled {run_id} ({env.event_id})")
