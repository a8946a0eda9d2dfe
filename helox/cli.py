"""`helox`: run the pipeline, the local stack, and look inside Synapse (the event bus)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Annotated, Any

import redis
import typer
from rich.console import Console
from rich.table import Table

from contracts import (
    TOPICS,
    CheckpointSaved,
    DataPrepProgress,
    DatasetReady,
    Envelope,
    EvaluationCompleted,
    HealthAlert,
    ModelReady,
    Producer,
    RunFailed,
    RunRequested,
    TrainerAction,
    TrainerCommand,
    TrainingCompleted,
    TrainingMetrics,
    TrainingStarted,
    topic,
    topic_for,
)
from contracts.codec import envelope
from shared.bus import admin
from shared.bus.wire import encode_entry
from shared.config import ConfigError, HeloxSettings, load_settings
from shared.redis_server import RedisServer

from .runconfig import load_run_config
from .stack import SERVICES, LocalStack, find_running_stack

app = typer.Typer(help="Helox: train language models as event-driven services.", no_args_is_help=True)
events_app = typer.Typer(help="Follow events on Synapse.", no_args_is_help=True)
dlq_app = typer.Typer(help="Inspect and replay dead letters.", no_args_is_help=True)
app.add_typer(events_app, name="events")
app.add_typer(dlq_app, name="dlq")
data_app = typer.Typer(help="Prepare and inspect datasets without the bus.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console()
err = Console(stderr=True)
CLI_PRODUCER = Producer(service="cli", instance=f"cli-{os.getpid()}")

TERMINAL_FOR_STAGE = {
    "data": DatasetReady,
    "train": TrainingCompleted,
    "eval": EvaluationCompleted,
    "export": ModelReady,
}


def _settings(config: Path | None = None) -> HeloxSettings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


def _interrupt(_sig: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM both stop a stack cleanly (SIGINT may be ignored when backgrounded)."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


def _load_run(config: Path) -> tuple[Any, HeloxSettings]:
    """The run config and the settings (its `settings:` section + env), or exit 2 naming the field."""
    try:
        return load_run_config(config), load_settings(config)
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


def _client(settings: HeloxSettings) -> redis.Redis:
    url = settings.redis_url or find_running_stack(settings)
    if not url:
        err.print("[red]error:[/red] no Redis: set HELOX_REDIS_URL or start the local stack with `helox up`")
        raise typer.Exit(2)
    return redis.Redis.from_url(url, socket_timeout=10)


@contextlib.contextmanager
def _reading(settings: HeloxSettings) -> Iterator[redis.Redis]:
    """A client for a command that only reads events: the configured Redis, a running local
    stack's, or else the local stack's own data on disk (its embedded Redis started on that
    data for the command's length), so that a run `helox run` finished can still be watched
    back or reported after its stack stopped."""
    if settings.redis_url or find_running_stack(settings):
        yield _client(settings)
        return
    data = Path(settings.state_dir).resolve() / "redis"
    if not data.is_dir():
        err.print("[red]error:[/red] no Redis: set HELOX_REDIS_URL or start the local stack with `helox up` "
                  f"(and no local stack data in {data})")
        raise typer.Exit(2)
    server = RedisServer(data).start()
    try:
        yield redis.Redis.from_url(server.url, socket_timeout=10)
    finally:
        server.stop()


# --- the local stack ------------------------------------------------------------------


@app.command()
def up(
    evaluators: Annotated[int, typer.Option(min=1, max=32, help="Evaluator instances (one consumer group).")] = 1,
    services: Annotated[str, typer.Option(help="Comma-separated services to start.")] = ",".join(SERVICES),
    config: Annotated[Path | None, typer.Option(help="YAML file with a `settings:` section.")] = None,
) -> None:
    """Start Redis (embedded unless HELOX_REDIS_URL is set) and the services; Ctrl-C stops all."""
    settings = _settings(config)
    stack = LocalStack(settings, evaluators=evaluators, config_path=config,
                       services=[s.strip() for s in services.split(",") if s.strip()])
    _stop_on_signals()
    stack.start()
    console.print(f"[green]stack up[/green]: redis {stack.redis_url}; logs in {stack.log_dir}")
    for slot in stack.slots:
        console.print(f"  {slot.instance:<20} pid {slot.proc.pid if slot.proc else '-'}")
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


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Live instances (from heartbeats), stream lengths, pending per group, dead letters."""
    settings = _settings()
    client = _client(settings)
    instances = admin.live_instances(client, settings.topic_prefix)
    streams = admin.stream_states(client, settings.topic_prefix)
    dlq_len = next(s.length for s in streams if s.topic == "dlq")
    if as_json:
        print(json.dumps({
            "instances": [i.__dict__ for i in instances],
            "streams": [{**s.__dict__, "groups": [g.__dict__ for g in s.groups]} for s in streams],
            "dead_letters": dlq_len,
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


# --- events ---------------------------------------------------------------------------


def _follow(
    client: redis.Redis, streams: list[str], *, start: str = "$", block_ms: int = 500
) -> Iterator[tuple[str, str, Envelope[Any] | None, dict[bytes, bytes]]]:
    """Yield (stream, entry id, envelope or None, fields) as events arrive, forever."""
    last = {s: start for s in streams}
    if start == "$":
        for s in streams:  # pin "now" so nothing between reads is missed
            rows = client.xrevrange(s, count=1)
            last[s] = rows[0][0].decode() if rows else "0-0"
    while True:
        got = client.xread(last, block=block_ms, count=500)
        if not got:
            yield "", "", None, {}
            continue
        batch = []
        for stream, rows in got:
            name = stream.decode()
            for entry_id, fields in rows:
                last[name] = entry_id.decode()
                batch.append((entry_id.decode(), name, fields))
        batch.sort(key=lambda r: tuple(int(x) for x in r[0].split("-")))
        for entry_id, name, fields in batch:
            yield name, entry_id, admin.decode_entry(fields), fields


def describe(env: Envelope[Any]) -> str:
    """One line for humans."""
    p = env.payload
    match p:
        case TrainingMetrics():
            extra = f" val={p.val_loss:.4f}" if p.val_loss is not None else ""
            return f"step {p.step} loss={p.loss:.4f} lr={p.lr:.2e} gn={p.grad_norm:.3f} tok/s={p.tokens_per_s:.0f}{extra}"
        case DataPrepProgress():
            return f"{p.stage} {p.fraction:.0%} {p.detail}"
        case DatasetReady():
            return f"dataset {p.dataset_version} ({p.tokens}, {p.documents} docs{', reused' if p.reused else ''})"
        case TrainingStarted():
            return f"training {p.model_preset} ({p.n_params:,} params) on {p.device}/{p.precision}, {p.total_steps} steps"
        case CheckpointSaved():
            return f"checkpoint step {p.step} ({p.reason}) {p.checkpoint.uri}"
        case HealthAlert():
            return f"{p.state} {p.severity} {p.kind} steps {p.step_start}-{p.step_end}: {p.message}"
        case TrainerAction():
            return f"{p.action} at step {p.step}: {p.reason}"
        case TrainingCompleted():
            return f"done: {p.final_step} steps, loss {p.final_loss:.4f}, {p.wall_time_s:.0f}s"
        case EvaluationCompleted():
            return f"eval step {p.step}: {p.verdict} {json.dumps(p.metrics)}"
        case ModelReady():
            return f"model {p.model_id}: {', '.join(p.formats)}"
        case RunFailed():
            return f"FAILED in {p.stage}: {p.reason}"
        case RunRequested():
            return f"run {p.name} requested: stages {p.stages}"
    return p.model_dump_json()[:200]


@events_app.command("tail")
def events_tail(
    topic_key: Annotated[str | None, typer.Option("--topic", help="Topic key, e.g. train.metrics.")] = None,
    run: Annotated[str | None, typer.Option(help="Only events of this run id.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON envelope per line.")] = False,
    from_start: Annotated[bool, typer.Option("--from-start", help="Replay the stream history first.")] = False,
    count: Annotated[int | None, typer.Option(help="Stop after this many events.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
) -> None:
    """Follow events as they happen (Ctrl-C to stop)."""
    settings = _settings()
    client = _client(settings)
    try:
        keys = [topic(topic_key).key] if topic_key else list(TOPICS)
    except KeyError as exc:
        err.print(f"[red]error:[/red] {exc.args[0]}")
        raise typer.Exit(2) from exc
    streams = [TOPICS[k].stream(settings.topic_prefix) for k in keys]
    seen = 0
    deadline = time.monotonic() + timeout if timeout else None
    with contextlib.suppress(KeyboardInterrupt):
        for stream, entry_id, env, _fields in _follow(client, streams, start="0-0" if from_start else "$"):
            if deadline and time.monotonic() > deadline:
                break
            if not stream:
                continue
            if env is None:
                if not run:
                    console.print(f"[red]{stream} {entry_id}: not a valid Helox event[/red]")
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


# --- dead letters ---------------------------------------------------------------------


@dlq_app.command("list")
def dlq_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List dead letters with their error."""
    settings = _settings()
    letters = admin.dead_letters(_client(settings), settings.topic_prefix, count=10_000)
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


@dlq_app.command("replay")
def dlq_replay(
    ids: Annotated[list[str] | None, typer.Argument(help="Dead-letter ids (from `helox dlq list`).")] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
) -> None:
    """Put dead letters back on their original stream (after fixing the cause)."""
    settings = _settings()
    client = _client(settings)
    targets = ids or []
    if replay_all:
        targets = [i for i, _l, _e in admin.dead_letters(client, settings.topic_prefix, count=100_000)]
    if not targets:
        err.print("nothing to replay: give ids or --all")
        raise typer.Exit(2)
    for entry_id in targets:
        try:
            new_id = admin.replay_dead_letter(client, settings.topic_prefix, entry_id)
        except (KeyError, ValueError) as exc:
            err.print(f"[red]{entry_id}: {exc}[/red]")
            raise typer.Exit(1) from exc
        console.print(f"{entry_id} -> replayed as {new_id}")


# --- commands to a running trainer ----------------------------------------------------


@app.command()
def command(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    what: Annotated[str, typer.Argument(help="pause|resume|checkpoint|stop|rollback|scale_lr|skip_data")],
    value: Annotated[float | None, typer.Option(help="Argument, e.g. LR factor.")] = None,
    reason: Annotated[str, typer.Option()] = "operator command",
) -> None:
    """Send a TrainerCommand to the trainer running RUN_ID."""
    settings = _settings()
    client = _client(settings)
    try:
        payload = TrainerCommand(command=what, value=value, reason=reason)  # type: ignore[arg-type]
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    env = envelope(payload, producer=CLI_PRODUCER, run_id=run_id)
    client.xadd(topic_for(TrainerCommand).stream(settings.topic_prefix), encode_entry(env))
    console.print(f"sent {what} to {run_id} ({env.event_id})")


# --- data, without the bus --------------------------------------------------------------


def _manifest_path(settings: HeloxSettings, version: str) -> Path:
    from shared.artifacts import ArtifactStore

    candidate = Path(version)
    if candidate.exists():
        return candidate / "manifest.json" if candidate.is_dir() else candidate
    path = ArtifactStore(settings.artifacts).path("datasets", version, "manifest.json")
    if not path.exists():
        err.print(f"[red]error:[/red] no dataset {version!r} in {settings.artifacts} (looked for {path})")
        raise typer.Exit(2)
    return path


@data_app.command("prepare")
def data_prepare(config: Annotated[Path, typer.Argument(help="Run config YAML (its corpus and data sections).")]) -> None:
    """Run the data-prep pipeline here, with progress bars, and print the dataset summary."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from services.data_prep.ingest import CorpusError
    from services.data_prep.pipeline import prepare_dataset
    from shared.artifacts import ArtifactStore
    from shared.data.config import data_prep_config
    from shared.data.manifest import format_summary, inspect_dataset

    cfg, settings = _load_run(config)
    store = ArtifactStore(settings.artifacts)
    columns = (TextColumn("{task.description:<16}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"), TimeElapsedColumn())
    with Progress(*columns, console=console) as bars:
        tasks: dict[str, Any] = {}

        def progress(stage: str, fraction: float) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=1.0)
            bars.update(tasks[stage], completed=fraction)

        try:
            result = prepare_dataset(data_prep_config(cfg.corpus, cfg.data), store, progress)
        except CorpusError as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from exc
    for report in result.reports:
        console.print(f"  {report.stage:<15} kept {report.docs_out:>7} removed {report.removed:>6} "
                      f"in {report.seconds:6.2f}s", highlight=False)
    console.print(format_summary(inspect_dataset(result.manifest_path)), highlight=False)
    console.print(f"[green]dataset {result.manifest.version}[/green]{' (reused)' if result.reused else ''}: "
                  f"{result.manifest_path}")


@data_app.command("inspect")
def data_inspect(version: Annotated[str, typer.Argument(help="Dataset version (or its directory).")]) -> None:
    """Print a dataset's manifest summary."""
    from shared.data.manifest import format_summary, inspect_dataset

    console.print(format_summary(inspect_dataset(_manifest_path(_settings(), version))), highlight=False)


@data_app.command("verify")
def data_verify(
    version: Annotated[str, typer.Argument(help="Dataset version (or its directory).")],
    quick: Annotated[bool, typer.Option(help="Sizes only, no re-hashing.")] = False,
) -> None:
    """Re-hash every shard against the manifest; exit 1 naming each corrupt file."""
    from shared.data.manifest import verify_dataset

    report = verify_dataset(_manifest_path(_settings(), version), full=not quick)
    if report.ok:
        console.print(f"[green]ok[/green]: {version}")
        return
    for problem in report.problems:
        err.print(f"[red]{problem}[/red]")
    raise typer.Exit(1)


# --- training, evaluation, export without the bus ---------------------------------------


def _signing_key(settings: HeloxSettings) -> str:
    from .stack import local_signing_key

    return settings.signing_key.get_secret_value() if settings.signing_key else local_signing_key(settings.state_dir)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Run config YAML (its train section).")],
    dataset: Annotated[str, typer.Option(help="Dataset version (or its directory) in the artifact store.")],
    resume: Annotated[str | None, typer.Option(help="'latest' or a checkpoint directory.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default: <artifacts>/runs/<name>).")] = None,
) -> None:
    """Train on a prepared dataset here, without the bus (metrics as log lines)."""
    from services.trainer.job import build_trainer, train_config_for_manifest
    from services.trainer.metrics import FunctionEmitter
    from shared.artifacts import ArtifactStore

    cfg, settings = _load_run(config)
    manifest_path = _manifest_path(settings, dataset)
    tcfg = train_config_for_manifest(cfg.train, manifest_path)
    run_dir = out or ArtifactStore(settings.artifacts).path("runs", cfg.name)

    def show(metrics: dict[str, Any]) -> None:
        console.print(f"step {metrics.get('step')}: loss {metrics.get('loss', float('nan')):.4f} "
                      f"lr {metrics.get('lr', 0):.2e} tok/s {metrics.get('tokens_per_s', 0):.0f}", highlight=False)

    trainer = build_trainer(tcfg, manifest_path, run_dir, run_id=cfg.name, callbacks=[FunctionEmitter(show)])
    signal.signal(signal.SIGTERM, lambda *_: trainer.request_stop("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: trainer.request_stop("interrupted"))
    result = trainer.fit(resume)
    console.print(f"[{'green' if result.status == 'completed' else 'yellow'}]{result.status}[/]: step "
                  f"{result.final_step}, loss {result.final_loss}, best val {result.best_val_loss}, "
                  f"last checkpoint {result.last_checkpoint}", highlight=False)
    raise typer.Exit(0 if result.status in ("completed", "stopped") else 1)


@app.command("eval")
def eval_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    suite: Annotated[Path | None, typer.Option(help="Directory of test suites (YAML/JSONL).")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset version or directory (default: the checkpoint's).")] = None,
    out: Annotated[Path | None, typer.Option(help="Where results.json goes.")] = None,
) -> None:
    """Evaluate one checkpoint here, without the bus."""
    from services.evaluator.evaluate import dataset_manifest_for, run_cli_eval

    settings = _settings()
    manifest = _manifest_path(settings, dataset) if dataset else dataset_manifest_for(checkpoint, settings.artifacts)
    summary = run_cli_eval(checkpoint, suite, manifest, out or checkpoint / "evaluation")
    console.print(summary, highlight=False)
    raise typer.Exit(1 if "error" in summary.split("\n", 1)[0].lower() else 0)


@app.command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    out: Annotated[Path, typer.Option(help="Output directory.")],
    formats: Annotated[str, typer.Option("--format", help="Comma-separated: native,hf,onnx,gguf,tensorrt.")] = "native,hf,onnx,gguf",
    dataset: Annotated[str | None, typer.Option(help="Dataset version or directory (default: the checkpoint's).")] = None,
) -> None:
    """Export a checkpoint (verified, fingerprinted, watermarked, signed) without the bus."""
    from services.evaluator.evaluate import dataset_manifest_for
    from services.exporter.export import dataset_tokenizer, export_checkpoint

    settings = _settings()
    manifest = _manifest_path(settings, dataset) if dataset else dataset_manifest_for(checkpoint, settings.artifacts)
    meta = json.loads((checkpoint / "manifest.json").read_text()).get("meta", {})
    result = export_checkpoint(checkpoint, dataset_tokenizer(manifest), [f.strip() for f in formats.split(",")], out,
                               run_id=meta.get("run_id") or "offline", dataset_version=meta.get("dataset_version"),
                               config_hash="0" * 64, signing_key=_signing_key(settings))
    for name, entry in result.formats.items():
        console.print(f"  {name:<10} {entry.get('status', 'ok'):<8} {entry.get('main', entry.get('reason', ''))}",
                      highlight=False)
    console.print(f"[green]exported[/green] {result.model_id} to {result.path} (fingerprint {result.fingerprint[:16]}…)")


@app.command()
def verify(path: Annotated[Path, typer.Argument(help="Export directory.")]) -> None:
    """Check an export's digests, fingerprint, signature and watermark; say which failed."""
    from services.exporter.verify import verify_export

    report = verify_export(path, _signing_key(_settings()))
    console.print(report.summary(), highlight=False)
    raise typer.Exit(0 if report.ok else 1)


def _run_events(client: redis.Redis, prefix: str, run_id: str) -> list[Envelope[Any]]:
    events = []
    for key, t in TOPICS.items():
        if key in ("services.heartbeat", "dlq"):
            continue
        for _id, fields in client.xrange(t.stream(prefix)):
            env = admin.decode_entry(fields)
            if env is not None and env.run_id == run_id:
                events.append(env)
    return sorted(events, key=lambda e: e.occurred_at)


@app.command()
def watch(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    once: Annotated[bool, typer.Option(help="Render once and exit.")] = False,
    refresh: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 1.0,
) -> None:
    """A live view of a run: loss and LR sparklines, throughput, grad norm, alerts and actions."""
    from services.health_monitor.watch import render_watch

    settings = _settings()
    with _reading(settings) as client:
        if once:
            console.print(render_watch(_run_events(client, settings.topic_prefix, run_id), run_id=run_id))
            return
        _watch_live(client, settings, run_id, refresh)


def _watch_live(client: redis.Redis, settings: HeloxSettings, run_id: str, refresh: float) -> None:
    from rich.live import Live

    from services.health_monitor.watch import render_watch

    with Live(console=console, refresh_per_second=4) as live, contextlib.suppress(KeyboardInterrupt):
        while True:
            events = _run_events(client, settings.topic_prefix, run_id)
            live.update(render_watch(events, run_id=run_id))
            if any(isinstance(e.payload, (TrainingCompleted, RunFailed, ModelReady)) for e in events[-5:]):
                break
            time.sleep(refresh)


@app.command()
def report(
    run_id: Annotated[str, typer.Argument(help="Run id.")],
    out: Annotated[Path | None, typer.Option(help="HTML file (default: <artifacts>/reports/<run>.html).")] = None,
) -> None:
    """Write an HTML report of a run (plots of loss, LR, grad norm, throughput, alerts, rollbacks) from its events."""
    from services.health_monitor.report import render_report
    from shared.artifacts import ArtifactStore, atomic_write_bytes

    settings = _settings()
    with _reading(settings) as client:
        events = _run_events(client, settings.topic_prefix, run_id)
    if not events:
        err.print(f"[red]error:[/red] no events for run {run_id!r}")
        raise typer.Exit(1)
    path = out or ArtifactStore(settings.artifacts).path("reports", f"{run_id}.html")
    atomic_write_bytes(path, render_report(events, title=f"Helox run {run_id}").encode())
    console.print(f"report: {path}")


# --- the main job ---------------------------------------------------------------------


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Run config YAML.")] = Path("configs/demo.yaml"),
    evaluators: Annotated[int, typer.Option(min=1, max=32)] = 1,
    keep_stack: Annotated[bool, typer.Option(help="Leave a stack started for this run running.")] = False,
) -> None:
    """Run the pipeline on CONFIG: use a running stack or start one, follow the run, summarise."""
    cfg, settings = _load_run(config)

    stack: LocalStack | None = None
    _stop_on_signals()
    url = settings.redis_url or find_running_stack(settings)
    if url is None:
        stack = LocalStack(settings, evaluators=evaluators, config_path=config)
        stack.start()
        url = stack.redis_url
        console.print(f"started a local stack (embedded redis at {url}); logs in {stack.log_dir}")
    else:
        console.print(f"using the stack at {url.split('@')[-1]}")
    assert url
    client = redis.Redis.from_url(url, socket_timeout=10)
    run_id = f"{cfg.name}-{uuid.uuid4().hex[:8]}"
    code = 1
    try:
        code = _run_and_follow(client, settings, cfg, run_id, stack)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]")
        code = 130
    finally:
        if stack and not keep_stack:
            console.print("stopping the local stack…")
            stack.stop()
    raise typer.Exit(code)


# Which consumer group must exist on which topic for a stage to run.
STAGE_CONSUMERS = {
    "data": ("runs.requested", "data-prep"),
    "train": ("data.dataset-ready", "trainer"),
    "eval": ("train.checkpoint-saved", "evaluator"),
    "export": ("eval.completed", "exporter"),
}


def _missing_consumers(client: redis.Redis, prefix: str, stages: list[str], wait_s: float = 30.0) -> list[str]:
    """Stages whose service has no consumer group yet (waiting a while for services to start)."""
    deadline = time.monotonic() + wait_s
    while True:
        missing = []
        for stage in stages:
            key, group = STAGE_CONSUMERS[stage]
            try:
                groups = {g["name"].decode() for g in client.xinfo_groups(TOPICS[key].stream(prefix))}
            except redis.ResponseError:
                groups = set()
            if group not in groups:
                missing.append(f"{stage} (no '{group}' consumer group on {key})")
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.5)


def _run_and_follow(client: redis.Redis, settings: HeloxSettings, cfg: Any, run_id: str, stack: LocalStack | None) -> int:
    prefix = settings.topic_prefix
    missing = _missing_consumers(client, prefix, cfg.stages, settings.startup_wait_s)
    if missing:
        err.print("[red]error:[/red] nothing handles these stages yet: " + "; ".join(missing))
        err.print("start the services (`helox up`) or drop those stages from the config's `stages:`")
        return 1
    lifecycle = [t.stream(prefix) for k, t in TOPICS.items() if k not in ("services.heartbeat",)]
    terminal = TERMINAL_FOR_STAGE[cfg.stages[-1]]
    follower = _follow(client, lifecycle, start="$")
    next(follower)  # pin the start position before publishing
    request = envelope(
        RunRequested(name=cfg.name, stages=cfg.stages, config=cfg.pipeline_config(), config_hash=cfg.config_hash()),
        producer=CLI_PRODUCER,
        run_id=run_id,
    )
    client.xadd(topic_for(RunRequested).stream(prefix), encode_entry(request))
    console.print(f"run [bold]{run_id}[/bold] requested: stages {', '.join(cfg.stages)}")
    started = time.monotonic()
    seen: dict[str, Envelope[Any]] = {}
    last_metric_print = 0.0
    for _stream, _entry_id, env, _fields in follower:
        elapsed = time.monotonic() - started
        if stack:
            for line in stack.supervise_once():
                console.print(f"[yellow]{line}[/yellow]")
        if elapsed > cfg.timeout_s:
            err.print(f"[red]timed out after {cfg.timeout_s:.0f}s[/red]; last events: {list(seen)}")
            return 1
        if env is None or env.run_id != run_id:
            continue
        seen[env.type] = env
        p = env.payload
        if isinstance(p, TrainingMetrics) and time.monotonic() - last_metric_print < 2 and not p.val_loss:
            continue
        if isinstance(p, TrainingMetrics):
            last_metric_print = time.monotonic()
        if isinstance(p, DataPrepProgress) and p.fraction not in (0.0, 1.0):
            continue
        console.print(f"[dim]{elapsed:6.1f}s[/dim] {env.producer.service:<14} {describe(env)}", highlight=False)
        if isinstance(p, RunFailed):
            _summary(seen, run_id, ok=False)
            return 1
        if isinstance(p, terminal) and (not isinstance(p, EvaluationCompleted) or p.is_final):
            _summary(seen, run_id, ok=True)
            if isinstance(p, ModelReady):
                _show_model(p, settings)
                ckpt = seen.get("CheckpointSaved")
                if ckpt is not None:
                    lag = (env.occurred_at - ckpt.occurred_at).total_seconds()
                    console.print(f"  final checkpoint saved -> model-ready: {lag:.1f}s; whole run: {elapsed:.0f}s")
            return 0
    return 1


def _summary(seen: dict[str, Envelope[Any]], run_id: str, *, ok: bool) -> None:
    table = Table(title=f"run {run_id}: {'[green]succeeded[/green]' if ok else '[red]failed[/red]'}")
    table.add_column("stage")
    table.add_column("result")
    for name, env in seen.items():
        if name in ("TrainingMetrics", "DataPrepProgress"):
            continue
        table.add_row(name, describe(env))
    console.print(table)


SAMPLE_PROMPT = "def "


def _show_model(ready: ModelReady, settings: HeloxSettings) -> None:
    """Where the exports are, the headline metrics, and a sample from the exported model
    (loaded and verified the way Cyrex loads it: ONNX Runtime, signature checked)."""
    from cyrex_example.loader import export_dir_of, load_from_event

    console.print(f"[bold]model {ready.model_id}[/bold] in {export_dir_of(ready)}")
    for name, ref in sorted(ready.formats.items()):
        console.print(f"  {name:<10} {ref.uri.removeprefix('file://')} ({ref.size_bytes / 1e6:.1f} MB)", highlight=False)
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in ready.metrics.items())
    console.print(f"  metrics: {metrics}", highlight=False)
    try:
        model = load_from_event(ready, _signing_key(settings), runtime="onnx" if "onnx" in ready.formats else "hf")
        sample = re.sub(r"\n{3,}", "\n\n", model.answer(SAMPLE_PROMPT, max_new_tokens=48))
    except Exception as exc:  # the run succeeded; a sample is a courtesy
        err.print(f"[yellow]could not sample from the export: {exc}[/yellow]")
        return
    console.print(f"  sample ({SAMPLE_PROMPT!r} ->):\n{SAMPLE_PROMPT}{sample}", highlight=False)


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
