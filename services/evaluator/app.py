"""evaluator wiring: CheckpointSaved -> evaluation (in a worker thread) -> EvaluationCompleted.

N instances share the `evaluator` consumer group, so each checkpoint goes to one of them.
Idempotent by checkpoint digest: a redelivered or reclaimed CheckpointSaved whose digest
is already judged is acked without work. While an evaluation runs, the bus keeps the
entry's claim alive, so the reclaim timeout stays short; an instance killed mid-evaluation
leaves the entry pending and another instance finishes it. Results are written to the
artifact store before the event is published and before the ack.

The run's `eval` section comes from the config file CheckpointSaved references
(`run_config`, verified by digest); EvaluationCompleted carries the reference on to the
exporter. A checkpoint without one is evaluated with the defaults.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from contracts import ArtifactRef, CheckpointSaved, Envelope, EvaluationCompleted
from shared.artifacts import ArtifactStore
from shared.bus import Delivery
from shared.cancellation import honour_cancellations, is_cancelled
from shared.logging import get_logger
from shared.runs import read_run_config, section
from shared.s3store import MANIFEST_NAME, S3Error
from shared.service import ServiceRuntime

from .config import EvalConfig
from .evaluate import evaluation_completed, previous_best_checkpoint, read_checkpoint_manifest, safe_evaluate

log = get_logger("helox.evaluator")


async def eval_config(rt: ServiceRuntime, run_config: ArtifactRef | None, run_id: str | None) -> EvalConfig:
    """The run's `eval` section, from the run config file (defaults for a checkpoint without one).

    Raises RunConfigError (a ValueError) when the file cannot be used, ValidationError when
    the section is invalid: the checkpoint then gets an error verdict naming why.
    """
    if run_config is None:
        log.warning("checkpoint carries no run_config reference; evaluating with defaults", run_id=run_id)
        return EvalConfig()
    config = await asyncio.to_thread(read_run_config, rt.store, run_config)
    return EvalConfig.model_validate(section(config, "eval"))


async def handle_checkpoint(rt: ServiceRuntime, env: Envelope[CheckpointSaved], _delivery: Delivery) -> None:
    ev = env.payload
    if await is_cancelled(rt, env.run_id):
        log.info("run cancelled; checkpoint not evaluated", run_id=env.run_id, step=ev.step)
        return
    if await rt.idempotency.seen(ev.digest):
        log.info("checkpoint already evaluated", digest=ev.digest)
        return
    out_dir = rt.store.path("evaluations", env.run_id or "no-run", ev.digest[:16])
    try:
        config = await eval_config(rt, ev.run_config, env.run_id)
        # Inputs through the verified cache (s3://) or verified in place (a local store): the
        # checkpoint's manifest by its digest, every file against the manifest.
        checkpoint_dir, manifest = await asyncio.to_thread(_inputs, rt.store, ev)
    except (ValidationError, ValueError, FileNotFoundError, S3Error) as exc:
        report = None
        error = f"{type(exc).__name__}: {exc}"
    else:
        rt.current_work = f"evaluating {env.run_id} step {ev.step}"
        try:
            previous = await asyncio.to_thread(previous_best, rt.store, ev.checkpoint, checkpoint_dir)
        except Exception:  # the checkpoint itself is unreadable: the evaluation reports it
            previous = None
        report = await asyncio.to_thread(
            safe_evaluate, checkpoint_dir, manifest, config, previous_best=previous, out_dir=out_dir
        )
        rt.current_work = None
        error = None
    payload = _completed(rt, ev, report, error, out_dir)
    await rt.bus.publish(payload)
    await rt.idempotency.commit(ev.digest, payload.verdict)
    log.info("checkpoint evaluated", step=ev.step, verdict=payload.verdict, metrics=payload.metrics)


def _inputs(store: ArtifactStore, ev: CheckpointSaved) -> tuple[Path, Path]:
    """(checkpoint directory, dataset manifest) as local paths, both verified."""
    checkpoint_dir = store.open_directory(ev.checkpoint)
    return checkpoint_dir, store.dataset_manifest(ev.dataset_version)


def previous_best(store: ArtifactStore, ref: ArtifactRef, checkpoint_dir: Path) -> Path | None:
    """The best earlier checkpoint of the same run (lowest finite metric, then latest), opened.

    A local store: the checkpoints beside this one. s3://: the checkpoints under the same
    `.../checkpoints/` prefix in the bucket (their manifests fetched, the chosen one opened)."""
    if not store.is_remote:
        return previous_best_checkpoint(checkpoint_dir)
    key = store.key(ref.uri)
    parts = key.split("/")
    if len(parts) < 3:
        return None
    step = int(read_checkpoint_manifest(checkpoint_dir).get("step", 0))
    parent = "/".join(parts[:-2])
    scored: list[tuple[float, int, ArtifactRef]] = []
    for k in store.list_keys(parent):
        rest = k[len(parent) + 1:].split("/")
        if len(rest) != 2 or rest[1] != MANIFEST_NAME or not rest[0].startswith("step-") or k == key:
            continue
        mref = store.current_ref(k)
        try:
            m = json.loads(store.read_verified(mref))
            s, metric = int(m.get("step", 0)), m.get("metric")
        except (ValueError, TypeError):
            continue
        if s < step and isinstance(metric, (int, float)) and math.isfinite(metric):
            scored.append((float(metric), -s, mref))
    if not scored:
        return None
    return store.open_directory(min(scored, key=lambda t: (t[0], t[1]))[2])


def _completed(rt: ServiceRuntime, ev: CheckpointSaved, report: Any, error: str | None, out_dir: Any) -> EvaluationCompleted:
    if report is None:
        return EvaluationCompleted(checkpoint=ev.checkpoint, checkpoint_digest=ev.digest, step=ev.step,
                                   verdict="error", gates_passed=False, error=error, evaluator=rt.instance,
                                   is_final=ev.is_final, run_config=ev.run_config)
    results = out_dir / "results.json"
    payload = evaluation_completed(
        report,
        checkpoint_ref=ev.checkpoint,
        results_ref=rt.store.ref(results) if results.exists() else None,
        evaluator=rt.instance,
        is_final=ev.is_final,
    )
    return payload.model_copy(update={"checkpoint_digest": ev.digest, "run_config": ev.run_config})


def setup(rt: ServiceRuntime) -> None:
    async def on_checkpoint(env: Envelope[CheckpointSaved], delivery: Delivery) -> None:
        await handle_checkpoint(rt, env, delivery)

    rt.bus.subscribe(CheckpointSaved, on_checkpoint)
    honour_cancellations(rt)  # a cancelled run's later checkpoints are skipped
