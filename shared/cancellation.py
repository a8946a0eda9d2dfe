"""Cancelled runs (`helox cancel RUN_ID` -> RunCancelled on runs.cancelled).

Every service that consumes RunCancelled records it as a marker in its own idempotency
namespace (`cancelled:<run_id>`), so that a restarted instance, or another one, still skips
the run's later events; the service doing the run's work at that moment stops it too (its
`on_cancel`). The stream is kept, so a service that was down when the run was cancelled
catches up when it starts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from contracts import Envelope, RunCancelled
from shared.bus import Delivery
from shared.logging import get_logger
from shared.service import ServiceRuntime

log = get_logger("helox.cancellation")


class RunCancelledError(Exception):
    """The run was cancelled while this service worked on it."""


def _key(run_id: str) -> str:
    return f"cancelled:{run_id}"


async def is_cancelled(rt: ServiceRuntime, run_id: str | None) -> bool:
    """Whether this service has seen the run cancelled."""
    return bool(run_id) and await rt.idempotency.seen(_key(run_id or ""))


def honour_cancellations(
    rt: ServiceRuntime,
    on_cancel: Callable[[str, RunCancelled], Awaitable[None]] | None = None,
    *,
    group: str | None = None,
) -> None:
    """Subscribe to RunCancelled: record each cancelled run, then call `on_cancel(run_id, event)`
    (stop the work in hand). `group`: a per-instance group when every instance must hear it."""

    async def on_cancelled(env: Envelope[RunCancelled], _delivery: Delivery) -> None:
        if not env.run_id:
            log.warning("RunCancelled without a run_id in its envelope; ignored", event_id=str(env.event_id))
            return
        await rt.idempotency.commit(_key(env.run_id), env.payload.reason or "cancelled")
        log.info("run cancelled", run_id=env.run_id, reason=env.payload.reason, by=env.payload.requested_by)
        if on_cancel is not None:
            await on_cancel(env.run_id, env.payload)

    rt.bus.subscribe(RunCancelled, on_cancelled, group=group)
