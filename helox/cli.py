"""`helox`: run the pipeline, the local stack, and look inside Synapse (the event bus).

This module only registers the commands (they live in helox/commands/) and holds the one
error boundary: a user error (helox/errors.py) is one line on stderr and exit 2.
"""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from .commands import bus, generate, offline, run, stack, views
from .common import err
from .errors import is_user_error, one_line

app = typer.Typer(help="Helox: train language models as event-driven services.", no_args_is_help=True)
events_app = typer.Typer(help="Follow events on Synapse.", no_args_is_help=True)
dlq_app = typer.Typer(help="Inspect and replay dead letters.", no_args_is_help=True)
data_app = typer.Typer(help="Prepare and inspect datasets without the bus.", no_args_is_help=True)
app.add_typer(events_app, name="events")
app.add_typer(dlq_app, name="dlq")
app.add_typer(data_app, name="data")

# the local stack and the bus
app.command()(stack.up)
app.command()(stack.status)
events_app.command("tail")(bus.events_tail)
dlq_app.command("list")(bus.dlq_list)
dlq_app.command("replay")(bus.dlq_replay)
app.command()(bus.command)
app.command()(bus.cancel)

# the stages, here and without the bus
data_app.command("prepare")(offline.data_prepare)
data_app.command("inspect")(offline.data_inspect)
data_app.command("verify")(offline.data_verify)
app.command()(offline.train)
app.command("eval")(offline.eval_cmd)
app.command("export")(offline.export_cmd)
app.command()(offline.verify)
app.command()(generate.generate)

# a run, live and afterwards
app.command()(views.watch)
app.command()(views.report)
app.command()(run.run)


def main(argv: list[str] | None = None) -> None:
    """The `helox` entry point: a user error prints one line naming what is at fault and exits 2;
    anything else keeps its traceback."""
    try:
        app(args=argv, prog_name="helox")
    except Exception as exc:
        if not is_user_error(exc):
            raise
        err.print(f"[red]error:[/red] {escape(one_line(exc))}", soft_wrap=True, highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
