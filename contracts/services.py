"""Who publishes and who consumes each topic: the one description the AsyncAPI document
(`contracts.asyncapi`) and the Redis ACL file (`deploy/acl.py`) are both generated from.

A *service* is one of the five Helox processes (`python -m services.<package>`); a
*client* is a process that is not a Helox service but talks to the bus with its own Redis
user: the `helox` CLI and Cyrex (outside).

- `publishes`: topics it XADDs to;
- `consumes`: topics it reads through a consumer group (XREADGROUP, XACK, XAUTOCLAIM...);
- `reads`: topics it may only read (XRANGE/XREVRANGE/XREAD/XINFO), never through a group;
- `replays`: topics it may re-publish dead letters to (the CLI's `dlq replay`);
- `deletes`: topics it may delete entries from (XDEL: a replayed dead letter).

Every service also publishes heartbeats and dead letters, and keeps idempotency and
outbox markers under `helox:idem:<service>:*` and `helox:outbox:<service>:*`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .envelope import SERVICE_NAMES
from .topics import TOPICS, marker_prefix

EVERY_SERVICE_PUBLISHES = ("services.heartbeat", "dlq")
"""Topics every service writes: its heartbeats and its dead letters."""


@dataclass(frozen=True)
class Participant:
    """One bus participant (a service or a client) and its topics, by topic key."""

    name: str
    kind: Literal["service", "client"]
    description: str
    publishes: tuple[str, ...] = ()
    consumes: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    replays: tuple[str, ...] = ()
    deletes: tuple[str, ...] = ()
    module: str | None = None
    """`python -m <module>` starts it (services only)."""

    @property
    def redis_user(self) -> str:
        """Its Redis ACL user name."""
        return self.name

    @property
    def key_patterns(self) -> tuple[str, ...]:
        """Non-stream keys it owns (glob patterns): idempotency and outbox markers."""
        if self.kind != "service":
            return ()
        ns = marker_prefix()
        return (f"{ns}idem:{self.name}:*", f"{ns}outbox:{self.name}:*")

    def readable(self) -> tuple[str, ...]:
        """Every topic it may read, in registry order."""
        wanted = set(self.publishes) | set(self.consumes) | set(self.reads)
        return tuple(k for k in TOPICS if k in wanted)


def _service(
    name: str,
    package: str,
    description: str,
    *,
    publishes: tuple[str, ...],
    consumes: tuple[str, ...],
    reads: tuple[str, ...] = (),
) -> Participant:
    return Participant(
        name=name,
        kind="service",
        description=description,
        publishes=publishes + EVERY_SERVICE_PUBLISHES,
        consumes=consumes,
        reads=reads,
        module=f"services.{package}",
    )


SERVICES: dict[str, Participant] = {
    p.name: p
    for p in (
        _service(
            "data-prep",
            "data_prep",
            "Turns a run request into a versioned, deduplicated, tokenized dataset.",
            consumes=("runs.requested", "runs.cancelled"),
            # RAG packing: finds retrievers by their heartbeats, sends requests and reads the
            # answers (XREAD from the id it asked at, filtered by request id: no group).
            reads=("retrieval.heartbeat", "retrieval.completed"),
            publishes=("data.progress", "data.dataset-ready", "runs.failed", "retrieval.requested",
                       "retrieval.fallback"),
        ),
        _service(
            "trainer",
            "trainer",
            "Trains the model on a dataset; applies health alerts and operator commands.",
            consumes=("data.dataset-ready", "health.alerts", "train.commands", "runs.cancelled"),
            # The run's configuration travels in its RunRequested, found by causation id.
            reads=("runs.requested",),
            publishes=(
                "train.started",
                "train.metrics",
                "train.checkpoint-saved",
                "train.actions",
                "train.completed",
                "runs.failed",
            ),
        ),
        _service(
            "health-monitor",
            "health_monitor",
            "Detects training incidents in the metrics stream and raises alerts.",
            # train.started / train.completed / runs.failed / train.actions tell it which runs
            # are active (and about rollbacks); its own health.alerts rebuild it after a restart.
            consumes=("train.metrics", "train.started", "train.completed", "runs.failed", "train.actions"),
            publishes=("health.alerts",),
        ),
        _service(
            "evaluator",
            "evaluator",
            "Evaluates each checkpoint once (N instances share one consumer group).",
            consumes=("train.checkpoint-saved", "runs.cancelled"),
            publishes=("eval.completed", "runs.failed", "retrieval.requested", "retrieval.fallback"),
            # Retrieval-conditioned suites ask retrievers as data-prep does.
            reads=("runs.requested", "retrieval.heartbeat", "retrieval.completed"),
        ),
        _service(
            "exporter",
            "exporter",
            "Exports, verifies and signs the model of a finished, evaluated run.",
            consumes=("eval.completed", "train.completed", "runs.cancelled"),
            publishes=("export.model-ready", "runs.failed"),
            reads=("runs.requested", "train.checkpoint-saved"),
        ),
    )
}
"""The five Helox services, by service name (the name used in heartbeats, logs, compose
and consumer groups)."""


def _dead_letter_sources() -> tuple[str, ...]:
    """Topics a dead letter can come from: those some service consumes through a group."""
    consumed = {k for s in SERVICES.values() for k in s.consumes}
    return tuple(k for k in TOPICS if k in consumed)


CLIENTS: dict[str, Participant] = {
    p.name: p
    for p in (
        Participant(
            name="cli",
            kind="client",
            description="The `helox` CLI: requests runs, commands the trainer, inspects every "
            "stream and replays dead letters to the stream they came from (then deletes "
            "them from the dead-letter stream).",
            publishes=("runs.requested", "train.commands", "runs.cancelled"),
            reads=tuple(TOPICS),
            replays=_dead_letter_sources(),
            deletes=("dlq",),
        ),
        Participant(
            name="cyrex",
            kind="client",
            description="Cyrex (outside Helox): consumes published models, serves retrieval "
            "requests and announces itself; may read every other stream. Redis ACLs cannot tell "
            "consumer groups apart, so Cyrex gets consumer-group commands only on streams no Helox "
            "service consumes.",
            consumes=("export.model-ready", "retrieval.requested"),
            publishes=("retrieval.heartbeat", "retrieval.completed"),
            reads=tuple(TOPICS),
        ),
    )
}
"""Bus participants that are not Helox services, by Redis user name."""

PARTICIPANTS: dict[str, Participant] = {**SERVICES, **CLIENTS}


def publishers(topic_key: str) -> list[str]:
    """Names of the participants that publish a topic (services first)."""
    return [p.name for p in PARTICIPANTS.values() if topic_key in p.publishes]


def consumers(topic_key: str) -> list[str]:
    """Names of the participants that consume a topic through a consumer group."""
    return [p.name for p in PARTICIPANTS.values() if topic_key in p.consumes]


def _check() -> None:
    """Fail at import when the description names an unknown topic or service."""
    if tuple(SERVICES) != SERVICE_NAMES:
        raise AssertionError(f"contracts.services.SERVICES {tuple(SERVICES)} != SERVICE_NAMES {SERVICE_NAMES}")
    for p in PARTICIPANTS.values():
        for field in ("publishes", "consumes", "reads", "replays", "deletes"):
            unknown = [k for k in getattr(p, field) if k not in TOPICS]
            if unknown:
                raise AssertionError(f"{p.name}.{field} names unknown topics {unknown}")


_check()
