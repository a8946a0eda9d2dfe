"""data-prep wiring: RunRequested -> the pipeline (in a worker thread) -> DatasetReady or RunFailed.

data-prep is the run's first consumer: it reads the run config from the request's
`run_config` reference (written by the requester, e.g. `helox run`), or, for a request
without one (an outside requester), validates its own sections of the inline config and
writes runs/<run_id>/config.json itself. Either way DatasetReady carries the reference on.

A redelivered RunRequested does not redo finished work: the run's idempotency marker
stops it, and an identical dataset version already in the store is reused by the
pipeline without recomputation.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Literal

from pydantic import ValidationError

from contracts import ArtifactRef, DataPrepProgress, DatasetReady, Envelope, RunCancelled, RunFailed, RunRequested
from services.data_prep.ingest import CorpusError
from services.data_prep.pipeline import PrepareResult, prepare_dataset
from services.data_prep.request import checked_request
from services.data_prep.semantic import SemanticDedupError
from services.data_prep.tokenizer import TokenizerError
from services.runconfig import InvalidRunConfigError
from shared.artifacts import ArtifactStore
from shared.bus import Delivery
from shared.cancellation import RunCancelledError, honour_cancellations, is_cancelled
from shared.data.config import DataPrepConfig
from shared.logging import get_logger
from shared.retrieval import RetrieverUnavailableError, SynapseLink
from shared.runs import (
    RunConfigError,
    RunConfigMissingError,
    read_run_config,
    request_config,
    write_run_config,
)
from shared.service import ServiceRuntime

log = get_logger("helox.data_prep")

REQUEST_ERRORS = (InvalidRunConfigError, RunConfigError)
"""The request itself is unusable (a bad value in any section, an unreadable config file): the
run fails at stage `request`, naming the field, before any work."""

USER_ERRORS = (CorpusError, TokenizerError, SemanticDedupError, ValidationError, RetrieverUnavailableError)
"""Errors a retry cannot fix: the run fails at once, naming the reason."""

PROGRESS_EVERY_S = 0.5


def dataset_ready(result: PrepareResult, store: ArtifactStore, run_config: ArtifactRef | None = None) -> DatasetReady:
    m = result.manifest
    directory = result.manifest_path.parent
    return DatasetReady(
        dataset_version=m.version,
        manifest=store.ref(result.manifest_path),
        tokenizer=store.ref(directory / m.tokenizer.path),
        vocab_size=m.tokenizer.vocab_size,
        tokens={"train": m.tokens("train"), "validation": m.tokens("val")},
        domains=m.domain_names,
        documents=sum(d.documents for d in m.domains.values()),
        reused=result.reused,
        parent_version=m.parent_version,
        run_config=run_config,
    )


def requested_config(store: ArtifactStore, request: RunRequested) -> tuple[dict[str, Any], ArtifactRef | None]:
    """The run's config and its reference; None when the file is still to be written.

    A reference into another store (a requester that does not share ours) is not fatal: the
    request carries the config inline too (for `helox run`'s requests the file written from it
    is byte-identical to the one referenced).
    """
    if request.run_config is not None:
        try:
            return read_run_config(store, request.run_config), request.run_config
        except RunConfigMissingError as exc:
            log.warning("the request's run config is not in this store: using its inline copy", error=str(exc))
    return request_config(request), None


def prepare_config(store: ArtifactStore, run_id: str, request: RunRequested,
                   corpus_roots: list[str]) -> tuple[DataPrepConfig, ArtifactRef]:
    """This service's sections, once the whole run config passed the request gate (every
    section valid, corpus roots inside the deployment's), and the run config's reference
    (written now when the request brought none, and only once the config is valid)."""
    config, ref = requested_config(store, request)
    source = request.run_config.uri if ref is not None and request.run_config else f"the inline config of run {run_id}"
    data = checked_request(config, source, corpus_roots)
    if ref is None:
        ref = write_run_config(store, run_id, config)
    return data, ref


def synapse_link(rt: ServiceRuntime, env: Envelope[RunRequested]) -> SynapseLink:
    """The retrieval stage's own (synchronous) way onto Synapse, as this instance, caused by the request."""
    return SynapseLink(rt.settings.redis_url or "", rt.bus.prefix, rt.bus.producer, run_id=env.run_id,
                       causation_id=env.event_id, correlation_id=env.correlation_id or env.event_id)


async def handle_run_requested(rt: ServiceRuntime, env: Envelope[RunRequested], delivery: Delivery) -> None:
    req, run_id = env.payload, env.run_id
    if "data" not in req.stages:
        return
    if not run_id:
        log.error("RunRequested without a run_id in its envelope: nothing downstream could follow it; ignored",
                  event_id=str(env.event_id))
        return
    key = f"run:{run_id}"
    if await rt.idempotency.seen(key):
        log.info("run already prepared; skipping redelivery", run_id=run_id)
        return
    if await is_cancelled(rt, run_id):
        log.info("run cancelled before data prep; skipped", run_id=run_id)
        return
    loop = asyncio.get_running_loop()
    last = {"t": 0.0, "stage": ""}
    cancelled = threading.Event()

    def progress(stage: str, fraction: float) -> None:
        # Called from the pipeline's thread: hop onto the loop, throttled per stage. Also where
        # a cancelled run stops (the pipeline reports progress all along each stage).
        if cancelled.is_set():
            raise RunCancelledError(f"run {run_id} was cancelled during data prep ({stage})")
        now = time.monotonic()
        if stage == last["stage"] and now - last["t"] < PROGRESS_EVERY_S and fraction < 1.0:
            return
        last.update(t=now, stage=stage)
        rt.current_work = f"run {env.run_id}: {stage} {fraction:.0%}"
        asyncio.run_coroutine_threadsafe(
            rt.bus.publish(DataPrepProgress(stage=stage, fraction=min(max(fraction, 0.0), 1.0)), cause=env), loop
        )

    try:
        config, run_config = await asyncio.to_thread(prepare_config, rt.store, run_id, req,
                                                     rt.settings.corpus_roots)
    except REQUEST_ERRORS as exc:
        await _fail(rt, env, exc, retriable=False, stage="request")
        await rt.idempotency.commit(key, "failed")
        return
    rt.state.setdefault("cancel", {})[run_id] = cancelled
    try:
        rt.current_work = f"run {run_id}: data prep"
        result = await asyncio.to_thread(prepare_dataset, config, rt.store, progress,
                                         synapse=synapse_link(rt, env) if config.rag is not None else None)
    except RunCancelledError as exc:
        await _fail(rt, env, exc, retriable=False, error_type="Cancelled")
        await rt.idempotency.commit(key, "cancelled")
        return
    except USER_ERRORS as exc:
        await _fail(rt, env, exc, retriable=False)
        await rt.idempotency.commit(key, "failed")
        return
    except Exception as exc:
        if delivery.delivery_count >= rt.settings.max_deliveries:
            await _fail(rt, env, exc, retriable=True)
            await rt.idempotency.commit(key, "failed")
            return
        raise  # transient? the entry stays pending and is redelivered
    finally:
        rt.current_work = None
        rt.state["cancel"].pop(run_id, None)
    ready = dataset_ready(result, rt.store, run_config)
    await rt.bus.publish(ready)
    await rt.idempotency.commit(key, ready.dataset_version)
    log.info("dataset ready", version=ready.dataset_version, reused=ready.reused, tokens=ready.tokens)


async def _fail(rt: ServiceRuntime, env: Envelope[Any], exc: BaseException, *, retriable: bool,
                stage: Literal["request", "data"] = "data", error_type: str | None = None) -> None:
    error_type = error_type or type(exc).__name__
    log.error("data prep failed", stage=stage, error=str(exc), error_type=error_type)
    await rt.bus.publish(RunFailed(stage=stage, reason=str(exc)[:2000], error_type=error_type, retriable=retriable))


def setup(rt: ServiceRuntime) -> None:
    async def on_run_requested(env: Envelope[RunRequested], delivery: Delivery) -> None:
        await handle_run_requested(rt, env, delivery)

    async def on_cancel(run_id: str, _event: RunCancelled) -> None:
        if (running := rt.state.get("cancel", {}).get(run_id)) is not None:
            running.set()  # the pipeline stops at its next progress report

    rt.bus.subscribe(RunRequested, on_run_requested)
    honour_cancellations(rt, on_cancel)
