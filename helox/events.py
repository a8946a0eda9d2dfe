"""Following events on Synapse, and one line per event for humans."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis

from contracts import (
    CheckpointSaved,
    DataPrepProgress,
    DatasetReady,
    Envelope,
    EvaluationCompleted,
    HealthAlert,
    ModelReady,
    RetrievalFallback,
    RunCancelled,
    RunFailed,
    RunRequested,
    TrainerAction,
    TrainingCompleted,
    TrainingMetrics,
    TrainingStarted,
)
from shared.bus import admin

# Back-off between reconnection attempts while Redis is away (a restart takes seconds).
RECONNECT_FIRST_S = 0.2
RECONNECT_MAX_S = 3.0
_LOST = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


def _say(notice: Callable[[str], None] | None, text: str) -> None:
    if notice is not None:
        notice(text)


def follow(
    client: redis.Redis,
    streams: list[str],
    *,
    start: str = "$",
    block_ms: int = 500,
    notice: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[tuple[str, str, Envelope[Any] | None, dict[bytes, bytes]]]:
    """Yield (stream, entry id, envelope or None, fields) as events arrive, forever; an idle
    read yields ("", "", None, {}) so that a caller can check its clock.

    When Redis goes away (a restart, a failover) this reconnects with back-off and reads on
    from the last entry id seen on each stream, so that nothing written meanwhile is missed
    or repeated; `notice` hears about the loss and the recovery. Idle ticks keep coming
    while Redis is away.
    """
    last = {s: start for s in streams}
    lost_at: float | None = None
    wait = RECONNECT_FIRST_S
    while True:
        try:
            for s in [s for s, v in last.items() if v == "$"]:  # pin "now": nothing between reads is missed
                rows = client.xrevrange(s, count=1)
                last[s] = rows[0][0].decode() if rows else "0-0"
            got = client.xread(last, block=block_ms, count=500)
        except _LOST as exc:
            if lost_at is None:
                lost_at = time.monotonic()
                _say(notice, f"lost Redis ({type(exc).__name__}: {exc}); reconnecting…")
            yield "", "", None, {}
            sleep(wait)
            wait = min(wait * 2, RECONNECT_MAX_S)
            continue
        if lost_at is not None:
            _say(notice, f"reconnected to Redis after {time.monotonic() - lost_at:.1f}s; "
                         "reading on from the last event seen")
            lost_at, wait = None, RECONNECT_FIRST_S
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
        case RunCancelled():
            return f"cancelled by {p.requested_by}: {p.reason}"
        case RunRequested():
            return f"run {p.name} requested: stages {p.stages}"
        case RetrievalFallback():
            return (f"WARNING retrieval fell back from {p.from_retriever or 'no retriever'} to {p.to_retriever} "
                    f"for {p.queries} queries: {p.reason}")
    return p.model_dump_json()[:200]
