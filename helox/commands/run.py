"""`helox run`: the main job. Publish RunRequested, follow the run to its end, summarise."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote, urlparse

import redis
import typer
from rich.table import Table

from contracts import (
    TOPICS,
    CheckpointSaved,
    DataPrepProgress,
    DatasetReady,
    Envelope,
    EvaluationCompleted,
    ModelReady,
    RunCancelled,
    RunFailed,
    RunRequested,
    TrainingCompleted,
    TrainingMetrics,
    topic_for,
)
from contracts.codec import envelope
from shared.artifacts import ArtifactStore
from shared.bus.wire import encode_entry
from shared.config import HeloxSettings
from shared.runs import write_run_config

from .. import common
from ..common import CLI_PRODUCER, console, err
from ..errors import CliError
from ..events import describe, follow
from ..runconfig import RunConfig
from ..stack import CYREX, LocalStack, default_cyrex_collection, find_running_stack

TERMINAL_FOR_STAGE = {
    "data": DatasetReady,
    "train": TrainingCompleted,
    "eval": EvaluationCompleted,
    "export": ModelReady,
}

# Which consumer group must exist on which topic for a stage to run.
STAGE_CONSUMERS = {
    "data": ("runs.requested", "data-prep"),
    "train": ("data.dataset-ready", "trainer"),
    "eval": ("train.checkpoint-saved", "evaluator"),
    "export": ("eval.completed", "exporter"),
}

# No trailing space: sentencepiece glues a space to the word after it ("▁name"), so a prompt
# ending in one leaves a lone "▁" the model rarely saw in training (after "def " the demo model
# wrote digits; after "def" it writes code).
SAMPLE_PROMPT = "def"
SAMPLE_TOKENS = 64


def run(
    config: Annotated[Path, typer.Argument(help="Run config YAML.")] = Path("configs/demo.yaml"),
    evaluators: Annotated[int, typer.Option(min=1, max=32)] = 1,
    keep_stack: Annotated[bool, typer.Option(help="Leave a stack started for this run running.")] = False,
    with_cyrex: Annotated[bool, typer.Option(
        "--with-cyrex", help="The stack started for this run also runs the reference Cyrex (retrieval for a "
        "`rag:` run, as `helox up --with-cyrex`).")] = False,
    cyrex_collection: Annotated[Path | None, typer.Option(
        help="Documents Cyrex indexes (.txt/.md/.py/.jsonl under it); default: the Python standard "
        "library, the demo's corpus.")] = None,
) -> None:
    """Run the pipeline on CONFIG: use a running stack or start one, follow the run, summarise."""
    cfg, settings = common.load_run(config)
    if cyrex_collection is not None and not with_cyrex:
        raise CliError("--cyrex-collection needs --with-cyrex")

    stack: LocalStack | None = None
    common.stop_on_signals()
    url = settings.redis_url or find_running_stack(settings)
    if url is not None and with_cyrex and not _stack_runs_cyrex(settings):
        # A running stack (or HELOX_REDIS_URL's services) is used as it is: Cyrex cannot be added to it.
        where = "HELOX_REDIS_URL is set" if settings.redis_url else f"a stack is running at {url.split('@')[-1]}"
        raise CliError(f"--with-cyrex: {where} without Cyrex; stop it and start `helox up --with-cyrex` "
                       "(or drop --with-cyrex and run `python -m cyrex_example serve` beside it)")
    if url is None:
        try:
            stack = LocalStack(settings, evaluators=evaluators, config_path=config,
                               cyrex_collection=(cyrex_collection or default_cyrex_collection()) if with_cyrex
                               else None)
        except ValueError as exc:  # a missing Cyrex collection
            raise CliError(str(exc)) from None
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


def _stack_runs_cyrex(settings: HeloxSettings) -> bool:
    """Whether the running `helox up` stack (its state file) supervises Cyrex."""
    if settings.redis_url or find_running_stack(settings) is None:
        return False
    try:
        instances = json.loads((Path(settings.state_dir).resolve() / "stack.json").read_text())["instances"]
    except (OSError, ValueError, KeyError):
        return False
    return f"{CYREX}-1" in instances


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


def _run_and_follow(client: redis.Redis, settings: HeloxSettings, cfg: RunConfig, run_id: str,
                    stack: LocalStack | None) -> int:
    prefix = settings.topic_prefix
    missing = _missing_consumers(client, prefix, cfg.stages, settings.startup_wait_s)
    if missing:
        err.print("[red]error:[/red] nothing handles these stages yet: " + "; ".join(missing), soft_wrap=True)
        err.print("start the services (`helox up`) or drop those stages from the config's `stages:`")
        return 1
    # Telemetry and RAG request/reply traffic are not the run's story (a fallback is, and shows).
    quiet = ("services.heartbeat", "retrieval.heartbeat", "retrieval.requested", "retrieval.completed")
    lifecycle = [t.stream(prefix) for k, t in TOPICS.items() if k not in quiet]
    terminal = TERMINAL_FOR_STAGE[cfg.stages[-1]]
    follower = follow(client, lifecycle, start="$", notice=common.notice)
    next(follower)  # pin the start position before publishing
    # The validated config goes to the store once; every event of the run references that file.
    run_config = write_run_config(ArtifactStore.from_settings(settings), run_id, cfg.pipeline_config())
    request = envelope(
        RunRequested(name=cfg.name, stages=cfg.stages, config=cfg.pipeline_config(), config_hash=cfg.config_hash(),
                     run_config=run_config),
        producer=CLI_PRODUCER,
        run_id=run_id,
    )
    client.xadd(topic_for(RunRequested).stream(prefix), encode_entry(request))
    console.print(f"run [bold]{run_id}[/bold] requested: stages {', '.join(cfg.stages)}")
    started = time.monotonic()
    seen: dict[str, Envelope[Any]] = {}
    export_watch = ExportWatch.of(cfg)
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
            err.print(f"[red]error:[/red] run {run_id} failed in {p.stage} ({p.error_type}): {_one_line(p.reason)}",
                      soft_wrap=True, highlight=False)
            return 2 if p.stage == "request" else 1  # a refused request is a user error, as a bad config
        if export_watch is not None and isinstance(p, CheckpointSaved | EvaluationCompleted):
            why = export_watch.observe(p)
            if why is not None:  # the exporter will not publish: waiting for ModelReady would hang
                _summary(seen, run_id, ok=False)
                err.print(f"[red]error:[/red] run {run_id}: {why}", soft_wrap=True, highlight=False)
                return 1
        if isinstance(p, RunCancelled):
            _summary(seen, run_id, ok=False)
            return 1
        if isinstance(p, terminal) and (not isinstance(p, EvaluationCompleted) or p.is_final):
            _summary(seen, run_id, ok=True)
            _show_rag(seen, settings)
            if isinstance(p, ModelReady):
                _show_model(p, settings)
                ckpt = seen.get("CheckpointSaved")
                if ckpt is not None:
                    lag = (env.occurred_at - ckpt.occurred_at).total_seconds()
                    console.print(f"  final checkpoint saved -> model-ready: {lag:.1f}s; whole run: {elapsed:.0f}s")
            return 0
    return 1


class ExportWatch:
    """Whether a ModelReady can still come, for a run that ends at `export` with `export.on:
    eval_passed` (the exporter publishes only a checkpoint whose evaluation passed every gate).

    - `export.checkpoint: final`: the final checkpoint's evaluation failing a gate (or erring)
      means no export, ever: the exporter skips it silently.
    - `export.checkpoint: best`: no export once the final checkpoint has been evaluated and so
      has every checkpoint saved before it, none of them passing.

    `observe` takes the run's CheckpointSaved and EvaluationCompleted events and returns the
    one-line reason when no export will come, else None.
    """

    def __init__(self, checkpoint: str) -> None:
        self.checkpoint = checkpoint
        self.saved: set[str] = set()  # digests of the checkpoints saved
        self.judged: dict[str, EvaluationCompleted] = {}  # digest -> its evaluation
        self.final: EvaluationCompleted | None = None

    @classmethod
    def of(cls, cfg: RunConfig) -> ExportWatch | None:
        if cfg.stages[-1] != "export" or cfg.export.get("on", "eval_passed") != "eval_passed":
            return None
        return cls(str(cfg.export.get("checkpoint", "final")))

    def observe(self, event: CheckpointSaved | EvaluationCompleted) -> str | None:
        if isinstance(event, CheckpointSaved):
            self.saved.add(event.digest)
            return None
        self.judged[event.checkpoint_digest] = event
        if event.is_final:
            self.final = event
        final = self.final
        if final is None or (passed(final) and self.checkpoint == "final"):
            return None
        if self.checkpoint == "final":
            return (f"the final checkpoint (step {final.step}, {final.checkpoint.uri}) {failed_gates(final)}; "
                    "the exporter publishes only a final checkpoint that passed (export.on: eval_passed), "
                    "so no model will be exported")
        if any(passed(e) for e in self.judged.values()) or not self.saved <= set(self.judged):
            return None  # an export is under way, or an evaluation is still to come
        return (f"no checkpoint of the run passed evaluation (export.checkpoint: best); the final one (step "
                f"{final.step}, {final.checkpoint.uri}) {failed_gates(final)}; no model will be exported")


def passed(ev: EvaluationCompleted) -> bool:
    return ev.verdict == "pass" and ev.gates_passed


def failed_gates(ev: EvaluationCompleted) -> str:
    """'failed the evaluator's gate parity (int8_dynamic: ...)', naming each failed gate and its evidence."""
    if ev.verdict == "error" and not ev.gates:
        return f"could not be evaluated: {_one_line(ev.error or 'no reason given')}"
    parts = []
    for gate in ev.gates:
        if gate.passed:
            continue
        try:
            detail = json.loads(gate.detail) if gate.detail else {}
        except json.JSONDecodeError:
            detail = {"detail": gate.detail}
        if not isinstance(detail, dict):
            detail = {"detail": detail}
        if gate.name == "parity":
            checks = [f"{name}: {_parity_evidence(ev.parity.get(name, {}))}" for name in detail.get("failed", [])]
            parts.append(f"parity ({'; '.join(checks) or 'failed'})")
            continue
        evidence = ", ".join(f"{k} {v}" for k, v in detail.items() if k != "verdict" and v is not None)
        parts.append(f"{gate.name} ({evidence})" if evidence else gate.name)
    if not parts:
        return f"was judged {ev.verdict}" + (f": {_one_line(ev.error)}" if ev.error else "")
    return f"failed the evaluator's gate{'s' if len(parts) > 1 else ''} " + ", ".join(parts)


def _parity_evidence(check: dict[str, Any]) -> str:
    if check.get("error"):
        return str(check["error"])
    shown = ("top1_agreement", "min_agreement", "decided_fraction", "ppl_rel_change", "max_ppl_increase",
             "max_abs_diff", "tol")
    out = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in check.items() if k in shown]
    return ", ".join(out) or "failed"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _summary(seen: dict[str, Envelope[Any]], run_id: str, *, ok: bool) -> None:
    table = Table(title=f"run {run_id}: {'[green]succeeded[/green]' if ok else '[red]failed[/red]'}")
    table.add_column("stage")
    table.add_column("result")
    for name, env in seen.items():
        if name in ("TrainingMetrics", "DataPrepProgress"):
            continue
        table.add_row(name, describe(env))
    console.print(table)


def export_dir_of(ready: ModelReady, store: ArtifactStore) -> Path:
    """The local export directory of a ModelReady event: its manifest's directory (s3://: the
    verified copy in this machine's artifact cache, every file checked against the manifest)."""
    if ready.manifest.uri.startswith("s3://"):
        return common.s3_directory(store, ready.manifest)
    parsed = urlparse(ready.manifest.uri)
    if parsed.scheme != "file":
        raise ValueError(f"the export manifest {ready.manifest.uri!r} is neither file:// nor s3://")
    return Path(unquote(parsed.path)).parent


def _show_rag(seen: dict[str, Envelope[Any]], settings: HeloxSettings) -> None:
    """For a RAG-packed run: which retriever served the windows (and any fallback), and the last
    evaluation's retrieval gain against the random-context control."""
    ready = seen.get("DatasetReady")
    if ready is not None:
        try:
            from shared.data.manifest import load_manifest

            rag = load_manifest(ArtifactStore.from_settings(settings).open_verified(ready.payload.manifest)).rag
        except Exception:  # a courtesy line; the run has already succeeded
            rag = None
        if rag is not None:
            served = ", ".join(f"{k} {v:,}" for k, v in rag.queries_by_retriever.items())
            console.print(f"  retrieval: {rag.retriever} (queries answered: {served}; "
                          f"{len(rag.fallbacks)} fallback(s))", highlight=False)
    ev = seen.get("EvaluationCompleted")
    gain = ev.payload.retrieval if ev is not None else None
    if gain and {"gain", "gain_bpb", "control_gain", "control_gain_bpb"} <= set(gain):
        console.print(f"  retrieval gain (step {ev.payload.step}): {gain['gain']:+.4f} nats/token "
                      f"({gain['gain_bpb']:+.4f} bits/byte) vs random-context control {gain['control_gain']:+.4f} "
                      f"({gain['control_gain_bpb']:+.4f})", highlight=False)


def _show_model(ready: ModelReady, settings: HeloxSettings) -> None:
    """Where the exports are, the headline metrics, and a sample from the exported model
    (verified first, then loaded into PyTorch: see helox/sample.py)."""
    console.print(f"[bold]model {ready.model_id}[/bold]: manifest {ready.manifest.uri}", highlight=False)
    for name, ref in sorted(ready.formats.items()):
        console.print(f"  {name:<10} {ref.uri.removeprefix('file://')} ({ref.size_bytes / 1e6:.1f} MB)", highlight=False)
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in ready.metrics.items())
    console.print(f"  metrics: {metrics}", highlight=False)
    from ..common import RUN_SAMPLING
    from ..sample import sample_from_export

    try:
        sample = sample_from_export(export_dir_of(ready, ArtifactStore.from_settings(settings)), common.signing_key(settings), SAMPLE_PROMPT,
                                    max_new_tokens=SAMPLE_TOKENS)
    except Exception as exc:  # the run succeeded; a sample is a courtesy
        err.print(f"[yellow]could not sample from the export: {exc}[/yellow]", soft_wrap=True)
        return
    bpb = ready.metrics.get("bits_per_byte")
    how = ", ".join(f"{k} {v}" for k, v in RUN_SAMPLING.items())
    console.print(f"  val bits/byte {bpb:.3f} (evaluator, validation split)" if bpb is not None
                  else "  val bits/byte: not evaluated", highlight=False)
    console.print(f"  sample ({SAMPLE_PROMPT!r} ->, {len(sample.token_ids)} tokens, {how}; most repeated 4-gram: "
                  f"{sample.max_4gram_repeats}x):", highlight=False)
    console.print(SAMPLE_PROMPT + re.sub(r"\n{3,}", "\n\n", sample.text), highlight=False, markup=False)
