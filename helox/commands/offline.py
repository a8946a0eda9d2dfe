"""`helox data prepare|inspect|verify`, `train`, `eval`, `export`, `verify`: the pipeline's
stages run here, without the bus."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from shared.config import ConfigError, describe_validation_error

from .. import common
from ..common import console, err


def data_prepare(config: Annotated[Path, typer.Argument(help="Run config YAML (its corpus and data sections).")]) -> None:
    """Run the data-prep pipeline here, with progress bars, and print the dataset summary."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from services.data_prep.pipeline import prepare_dataset
    from shared.artifacts import ArtifactStore
    from shared.data.config import data_prep_config
    from shared.data.manifest import format_summary, inspect_dataset

    cfg, settings = common.load_run(config)
    store = ArtifactStore(settings.artifacts)
    columns = (TextColumn("{task.description:<16}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"), TimeElapsedColumn())
    with Progress(*columns, console=console) as bars:
        tasks: dict[str, Any] = {}

        def progress(stage: str, fraction: float) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=1.0)
            bars.update(tasks[stage], completed=fraction)

        result = prepare_dataset(data_prep_config(cfg.corpus, cfg.data), store, progress)
    for report in result.reports:
        console.print(f"  {report.stage:<15} kept {report.docs_out:>7} removed {report.removed:>6} "
                      f"in {report.seconds:6.2f}s", highlight=False)
    console.print(format_summary(inspect_dataset(result.manifest_path)), highlight=False)
    console.print(f"  {result.status}", highlight=False)  # built / reused (verified ...) / rebuilt: why
    console.print(f"[green]dataset {result.manifest.version}[/green]{' (reused)' if result.reused else ''}: "
                  f"{result.manifest_path}")


def data_inspect(version: Annotated[str, typer.Argument(help="Dataset version (or its directory).")]) -> None:
    """Print a dataset's manifest summary."""
    from shared.data.manifest import format_summary, inspect_dataset

    console.print(format_summary(inspect_dataset(common.manifest_path(common.settings(), version))), highlight=False)


def data_verify(
    version: Annotated[str, typer.Argument(help="Dataset version (or its directory).")],
    quick: Annotated[bool, typer.Option(help="Sizes only, no re-hashing.")] = False,
) -> None:
    """Re-hash every shard against the manifest; exit 1 naming each corrupt file."""
    from shared.data.manifest import verify_dataset

    report = verify_dataset(common.manifest_path(common.settings(), version), full=not quick)
    if report.ok:
        console.print(f"[green]ok[/green]: {version}")
        return
    for problem in report.problems:
        err.print(f"[red]{problem}[/red]", soft_wrap=True, highlight=False)
    raise typer.Exit(1)


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

    cfg, settings = common.load_run(config)
    manifest_path = common.manifest_path(settings, dataset)
    try:
        tcfg = train_config_for_manifest(cfg.train, manifest_path)
    except ValidationError as exc:  # the section bound to the dataset (its vocabulary) no longer validates
        raise ConfigError(describe_validation_error(exc, f"{config} [train] with dataset {dataset}")) from exc
    run_dir = out or ArtifactStore(settings.artifacts).path("runs", cfg.name)

    def show(metrics: dict[str, Any]) -> None:
        console.print(f"step {metrics.get('step')}: loss {metrics.get('loss', float('nan')):.4f} "
                      f"lr {metrics.get('lr', 0):.2e} tok/s {metrics.get('tokens_per_s', 0):.0f}", highlight=False)

    trainer = build_trainer(tcfg, manifest_path, run_dir, run_id=cfg.name, callbacks=[FunctionEmitter(show)])
    # Ctrl-C / SIGTERM stop at the next step with a final checkpoint; the handlers are the run's only.
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, lambda *_: trainer.request_stop("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: trainer.request_stop("interrupted"))
    try:
        result = trainer.fit(resume)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    console.print(f"[{'green' if result.status == 'completed' else 'yellow'}]{result.status}[/]: step "
                  f"{result.final_step}, loss {result.final_loss}, best val {result.best_val_loss}, "
                  f"last checkpoint {result.last_checkpoint}", highlight=False)
    raise typer.Exit(0 if result.status in ("completed", "stopped") else 1)


def _dataset_of(checkpoint: Path, dataset: str | None) -> Path:
    """The dataset manifest given, else the one the checkpoint was trained on."""
    settings = common.settings()
    return common.manifest_path(settings, dataset) if dataset else common.checkpoint_dataset_manifest(settings, checkpoint)


def eval_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    suite: Annotated[Path | None, typer.Option(help="Directory of test suites (YAML/JSONL).")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset version or directory (default: the checkpoint's).")] = None,
    out: Annotated[Path | None, typer.Option(help="Where results.json goes.")] = None,
) -> None:
    """Evaluate one checkpoint here, without the bus."""
    from services.evaluator.evaluate import run_cli_eval

    summary = run_cli_eval(checkpoint, suite, _dataset_of(checkpoint, dataset), out or checkpoint / "evaluation")
    console.print(summary, highlight=False)
    raise typer.Exit(1 if "error" in summary.split("\n", 1)[0].lower() else 0)


def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    out: Annotated[Path, typer.Option(help="Output directory.")],
    formats: Annotated[str, typer.Option("--format", help="Comma-separated: native,hf,onnx,gguf,tensorrt.")] = "native,hf,onnx,gguf",
    dataset: Annotated[str | None, typer.Option(help="Dataset version or directory (default: the checkpoint's).")] = None,
    gguf_types: Annotated[str | None, typer.Option(help="Comma-separated GGUF files: f32,f16,bf16,q8_0 "
                                                   "(default: the exporter's, f32,f16,q8_0).")] = None,
) -> None:
    """Export a checkpoint (verified, fingerprinted, watermarked, signed) without the bus."""
    from services.evaluator.evaluate import read_checkpoint_manifest
    from services.exporter.export import dataset_tokenizer, export_checkpoint

    manifest = _dataset_of(checkpoint, dataset)
    meta = read_checkpoint_manifest(checkpoint).get("meta", {})
    result = export_checkpoint(checkpoint, dataset_tokenizer(manifest), [f.strip() for f in formats.split(",")], out,
                               run_id=meta.get("run_id") or "offline", dataset_version=meta.get("dataset_version"),
                               config_hash=None, signing_key=common.signing_key(common.settings()),
                               gguf_types=[t.strip() for t in gguf_types.split(",")] if gguf_types else None)
    for name, entry in result.formats.items():
        console.print(f"  {name:<10} {entry.get('status', 'ok'):<8} {entry.get('main', entry.get('reason', ''))}",
                      highlight=False)
    console.print(f"[green]exported[/green] {result.model_id} to {result.path} (fingerprint {result.fingerprint[:16]}…)")


def verify(path: Annotated[Path, typer.Argument(help="Export directory.")]) -> None:
    """Check an export's digests, fingerprint, signature and watermark; say which failed."""
    from services.exporter.verify import verify_export

    report = verify_export(path, common.signing_key(common.settings()))
    console.print(report.summary(), highlight=False, soft_wrap=True)
    raise typer.Exit(0 if report.ok else 1)
