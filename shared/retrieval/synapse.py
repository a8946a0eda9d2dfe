"""Retrieval over Synapse: discover a live Cyrex, ask it in batches, read its answers.

Synchronous (redis-py), because the caller is data-prep's pipeline, which runs in a worker
thread: requests and fallbacks are framed with the Bus's own encoder (`shared.bus.wire`),
answers read with its reader and `contracts.codec.decode`.

- Discovery (`discover`, `find_retriever`): the newest RetrieverHeartbeat of each instance on
  `retrieval.heartbeat`; an instance is alive when that heartbeat is younger than 3 x its
  interval_s, live (usable) when it also says status `ready`. Waits up to `timeout_s` for one
  to appear; an instance alive but still `indexing` its collection is waited for longer, up to
  `indexing_wait_s` from the start of discovery (Cyrex announces itself before it has indexed:
  a large collection takes minutes), as long as it keeps heart-beating.
- Requests (`SynapseRetriever.ask`): each batch is one RetrievalRequested with a deadline;
  answers are read with XREAD (no consumer group, as contracts/services.py says) from the
  newest id of `retrieval.completed` when the request was sent, filtered by request_id. The
  first answer per request_id counts (delivery is at-least-once); later copies are ignored.
- Faults are per query, for the caller to send to its fallback: a request unanswered by its
  deadline (a dead or slow Cyrex), an entry that cannot be decoded but names one of our
  request ids, or an answer whose results do not match the request's queries. Faulty entries
  are dead-lettered (the DeadLetter event with `wire.dead_letter_fields`, as the Bus does).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

from contracts import (
    DeadLetter,
    Event,
    Producer,
    RetrievalCompleted,
    RetrievalQuery,
    RetrievalRequested,
    RetrievalResult,
    RetrieverHeartbeat,
    topic_for,
)
from contracts.codec import decode
from contracts.codec import envelope as make_envelope
from shared.bus.wire import dead_letter_fields, encode_entry, read_entry
from shared.logging import get_logger

log = get_logger("helox.retrieval")

LIVENESS_INTERVALS = 3.0
"""A heartbeat younger than this many of its own interval_s says the retriever is alive."""
XREAD_BLOCK_MS = 200
HEARTBEAT_SCAN = 500
"""Newest heartbeat entries looked at when discovering (the stream is trimmed telemetry)."""


class RetrieverUnavailableError(RuntimeError):
    """rag.retriever requires Cyrex and no live one was found; the message names the setting."""


@dataclass
class SynapseLink:
    """How a synchronous caller talks to Synapse: the Redis URL, the deployment's topic prefix,
    who it is and which event caused the work (run id, causation and correlation ids)."""

    redis_url: str
    prefix: str
    producer: Producer
    run_id: str | None = None
    causation_id: uuid.UUID | None = None
    correlation_id: uuid.UUID | None = None
    _client: redis.Redis | None = field(default=None, repr=False)

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(self.redis_url, socket_timeout=10.0, socket_connect_timeout=5.0)
        return self._client

    def stream(self, payload: type[Event] | Event) -> str:
        return topic_for(payload).stream(self.prefix)

    def publish(self, payload: Event) -> str:
        """XADD one event, framed as the Bus frames it; returns the entry id."""
        env = make_envelope(payload, producer=self.producer, run_id=self.run_id, causation_id=self.causation_id,
                            correlation_id=self.correlation_id)
        topic = topic_for(payload)
        entry_id = self.client.xadd(topic.stream(self.prefix), encode_entry(env), maxlen=topic.retention.maxlen,
                                    approximate=True)
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    def newest_id(self, stream: str) -> str:
        """The id of the stream's newest entry ('0-0' when empty): where a reader of what comes next starts."""
        last = self.client.xrevrange(stream, count=1)
        if not last:
            return "0-0"
        entry_id = last[0][0]
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    def dead_letter(self, stream: str, entry_id: str, fields: dict[bytes, bytes], error: str, error_type: str,
                    event_type: str | None = None) -> None:
        """Record a raw entry in the dead-letter stream (read with XREAD: no group to ack in)."""
        self.publish(DeadLetter(
            original_stream=stream, original_id=entry_id, original_fields=dead_letter_fields(fields),
            error=error[:4000], error_type=error_type, group="", consumer=self.producer.instance,
            delivery_count=1, event_type=event_type,
        ))
        log.error("dead-lettered", stream=stream, entry_id=entry_id, error_type=error_type, error=error[:300])


def _heartbeats(link: SynapseLink, entries: list[Any]) -> list[tuple[datetime, RetrieverHeartbeat]]:
    out = []
    for _, fields in entries:
        try:
            env = decode(read_entry(fields)[0], RetrieverHeartbeat)
        except ValueError:  # not ours to judge: heartbeats are telemetry, a bad one is skipped
            continue
        out.append((env.occurred_at, env.payload))
    return out


def _newest(beats: list[tuple[datetime, RetrieverHeartbeat]], now: datetime) -> list[tuple[datetime, RetrieverHeartbeat]]:
    """Each instance's newest heartbeat, if it is fresh (< 3 x interval_s), newest first."""
    newest: dict[str, tuple[datetime, RetrieverHeartbeat]] = {}
    for at, hb in beats:
        if hb.instance not in newest or at > newest[hb.instance][0]:
            newest[hb.instance] = (at, hb)
    fresh = [(at, hb) for at, hb in newest.values() if (now - at).total_seconds() < LIVENESS_INTERVALS * hb.interval_s]
    return sorted(fresh, key=lambda x: x[0], reverse=True)


def live_retrievers(beats: list[tuple[datetime, RetrieverHeartbeat]], now: datetime) -> list[RetrieverHeartbeat]:
    """Instances whose newest heartbeat is fresh (< 3 x interval_s) and ready, newest first."""
    return [hb for _, hb in _newest(beats, now) if hb.status == "ready"]


def indexing_retrievers(beats: list[tuple[datetime, RetrieverHeartbeat]], now: datetime) -> list[RetrieverHeartbeat]:
    """Instances alive (fresh newest heartbeat) but still indexing, newest first."""
    return [hb for _, hb in _newest(beats, now) if hb.status == "indexing"]


@dataclass
class Discovery:
    """What discovery found: a ready retriever, or None and, if one was seen indexing, the last such."""

    retriever: RetrieverHeartbeat | None
    indexing: RetrieverHeartbeat | None = None
    """The last heartbeat of an instance seen alive but indexing (None: none was seen)."""
    waited_s: float = 0.0

    def reason(self, stream: str, timeout_s: float, indexing_wait_s: float) -> str:
        """Why no retriever was found, naming the setting that bounded the wait (for None only)."""
        if self.indexing is not None:
            hb = self.indexing
            return (f"{hb.name}:{hb.instance} announced itself on {stream} but was still indexing its collection "
                    f"after data.rag.indexing_wait_s = {indexing_wait_s} s (waited {self.waited_s:.1f} s)")
        return f"no live retriever on {stream} within data.rag.discovery_timeout_s = {timeout_s} s"


def find_retriever(link: SynapseLink, timeout_s: float, indexing_wait_s: float = 0.0) -> Discovery:
    """A live, ready retriever from `retrieval.heartbeat`: waiting up to timeout_s for one to
    appear, and up to indexing_wait_s (from now) while one is alive but still indexing."""
    stream = link.stream(RetrieverHeartbeat)
    started = time.monotonic()
    deadline = started + timeout_s
    patience = started + max(timeout_s, indexing_wait_s)
    recent = link.client.xrevrange(stream, count=HEARTBEAT_SCAN)
    beats = _heartbeats(link, list(reversed(recent)))
    cursor = recent[0][0] if recent else b"0-0"
    seen_indexing: RetrieverHeartbeat | None = None
    logged = False
    while True:
        now = datetime.now(UTC)
        live = live_retrievers(beats, now)
        if live:
            return Discovery(live[0], seen_indexing, time.monotonic() - started)
        indexing = indexing_retrievers(beats, now)
        if indexing:
            seen_indexing = indexing[0]
            if not logged:
                log.info("a retriever is still indexing: waiting for it to be ready", retriever=seen_indexing.name,
                         instance=seen_indexing.instance, indexing_wait_s=indexing_wait_s)
                logged = True
        # Someone indexing: wait up to indexing_wait_s; nobody alive: up to timeout_s.
        left = (patience if indexing else deadline) - time.monotonic()
        if left <= 0:
            return Discovery(None, seen_indexing, time.monotonic() - started)
        got = link.client.xread({stream: cursor}, count=100, block=max(1, int(min(left, 0.5) * 1000)))
        for _, entries in got or []:
            if entries:
                cursor = entries[-1][0]
                beats += _heartbeats(link, entries)


def discover(link: SynapseLink, timeout_s: float, indexing_wait_s: float = 0.0) -> RetrieverHeartbeat | None:
    """A live, ready retriever from `retrieval.heartbeat` (see find_retriever); None if none."""
    return find_retriever(link, timeout_s, indexing_wait_s).retriever


@dataclass
class BatchAnswer:
    """What became of one batch: the usable results by query id, and why the others failed."""

    request_id: str
    results: dict[str, RetrievalResult] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    """query id -> reason ('timed out after 5.0 s', 'malformed answer: ...', 'retriever error: ...')."""
    timed_out: bool = False
    malformed: bool = False


class SynapseRetriever:
    """Ask one discovered retriever (Cyrex) over Synapse; see the module docstring."""

    def __init__(self, link: SynapseLink, retriever: RetrieverHeartbeat, request_timeout_s: float,
                 max_in_flight: int = 4) -> None:
        self.link = link
        self.retriever = retriever
        self.request_timeout_s = request_timeout_s
        self.max_in_flight = max(1, max_in_flight)
        self.name = f"{retriever.name}:{retriever.instance}"
        self._completed = link.stream(RetrievalCompleted)

    def ask(self, batches: Sequence[Sequence[RetrievalQuery]]) -> list[BatchAnswer]:
        """Send the batches (at most max_in_flight unanswered at a time) and collect the answers, in order."""
        answers: list[BatchAnswer] = []
        for i in range(0, len(batches), self.max_in_flight):
            answers += self._round(batches[i : i + self.max_in_flight])
        return answers

    def _round(self, batches: Sequence[Sequence[RetrievalQuery]]) -> list[BatchAnswer]:
        cursor = self.link.newest_id(self._completed)  # answers come after this: XREAD from here
        pending: dict[str, tuple[BatchAnswer, list[RetrievalQuery], float]] = {}
        order = []
        for queries in batches:
            request_id = uuid.uuid4().hex
            deadline = datetime.now(UTC) + timedelta(seconds=self.request_timeout_s)
            self.link.publish(RetrievalRequested(
                request_id=request_id, requester=self.link.producer.instance, queries=list(queries),
                deadline=deadline, retriever=self.retriever.instance,
            ))
            answer = BatchAnswer(request_id)
            pending[request_id] = (answer, list(queries), time.monotonic() + self.request_timeout_s)
            order.append(answer)
        while pending:
            now = time.monotonic()
            for rid in [r for r, (_, _, dl) in pending.items() if dl <= now]:
                answer, queries, _ = pending.pop(rid)
                answer.timed_out = True
                reason = f"no answer from {self.name} within rag.request_timeout_s = {self.request_timeout_s} s"
                answer.failed = {q.query_id: reason for q in queries}
            if not pending:
                break
            wait = min(dl for _, _, dl in pending.values()) - now
            got = self.link.client.xread({self._completed: cursor}, count=100,
                                         block=max(1, min(XREAD_BLOCK_MS, int(wait * 1000))))
            for _, entries in got or []:
                for entry_id, fields in entries:
                    cursor = entry_id
                    self._take(entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id), fields, pending)
        return order

    def _take(self, entry_id: str, fields: dict[bytes, bytes],
              pending: dict[str, tuple[BatchAnswer, list[RetrievalQuery], float]]) -> None:
        try:
            env = decode(read_entry(fields)[0], RetrievalCompleted)
        except ValueError as exc:
            raw = b"".join(v for v in fields.values() if isinstance(v, bytes))
            mine = [rid for rid in pending if rid.encode() in raw]
            if not mine:
                return  # someone else's: not ours to judge
            self.link.dead_letter(self._completed, entry_id, fields, f"undecodable RetrievalCompleted: {exc}",
                                  "decode", "RetrievalCompleted")
            for rid in mine:
                answer, queries, _ = pending.pop(rid)
                answer.malformed = True
                answer.failed = {q.query_id: f"malformed answer (dead-lettered): {exc}"[:500] for q in queries}
            return
        done: RetrievalCompleted = env.payload
        if done.request_id not in pending:
            return  # another requester's, or a second copy of one we have
        answer, queries, _ = pending.pop(done.request_id)
        if done.error is not None:
            answer.failed = {q.query_id: f"retriever error: {done.error}"[:500] for q in queries}
            return
        wanted = {q.query_id for q in queries}
        seen: set[str] = set()
        dupes: set[str] = set()
        problems = []
        for res in done.results:
            if res.query_id not in wanted:
                problems.append(f"result for unknown query id {res.query_id!r}")
            elif res.query_id in seen:
                problems.append(f"second result for query id {res.query_id!r}")
                dupes.add(res.query_id)
            elif res.error is not None:
                seen.add(res.query_id)
                answer.failed[res.query_id] = f"retriever error: {res.error}"[:500]
            else:
                seen.add(res.query_id)
                answer.results[res.query_id] = res
        for qid in sorted(wanted - seen):
            problems.append(f"no result for query id {qid!r}")
            answer.failed[qid] = "malformed answer (dead-lettered): no result for this query"
        for qid in dupes:
            answer.results.pop(qid, None)
            answer.failed[qid] = "malformed answer (dead-lettered): two results for this query"
        if problems:
            answer.malformed = True
            self.link.dead_letter(self._completed, entry_id, fields,
                                  f"RetrievalCompleted {done.request_id} does not match its request: "
                                  + "; ".join(problems[:20]), "mismatch", "RetrievalCompleted")
