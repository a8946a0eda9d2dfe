"""`python -m cyrex_example serve`: the retrieval service and the model-ready subscriber in one process.

Threads:
- heartbeats: a RetrieverHeartbeat on `retrieval.heartbeat` every `heartbeat_s` seconds, status
  `indexing` while the index is built (digest of the empty index, counts 0), then `ready`, and
  one `stopping` on SIGTERM/SIGINT;
- requests (the main thread, once the index is ready): `retrieval.requested` in consumer group
  `cyrex` as consumer `<instance>`: first its own pending entries (a restart after a crash), then
  new ones; every `reclaim_idle_ms` it also takes over entries another consumer of the group left
  pending that long (XAUTOCLAIM). Every entry is acked once handled: answered with one
  RetrievalCompleted on `retrieval.completed`, or skipped (past its deadline, addressed to another
  instance, malformed) with a log line;
- models: `export.model-ready` in consumer group `cyrex` (model_ready.run), answering the prompt
  with context from the same index.

Logs are JSON lines on stderr; model answers are JSON lines on stdout.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from contracts import TOPICS, Producer, RetrievalCompleted, RetrievalRequested, RetrieverHeartbeat, decode, topic_for
from contracts.codec import envelope

from . import __version__
from .collection import DEFAULT_CHUNK_WORDS, index_digest, read_collection
from .loader import Runtime
from .model_ready import GROUP, ensure_group
from .model_ready import run as run_model_ready
from .retrieval import RETRIEVER_NAME, Bm25Index, answer
from .wire import entry_fields, read_body

REQUEST_TOPIC = "retrieval.requested"
EMPTY_DIGEST = index_digest([])


def log(event: str, **fields: Any) -> None:
    print(json.dumps({"ts": datetime.now(UTC).isoformat(), "logger": "cyrex", "event": event, **fields},
                     default=str), file=sys.stderr, flush=True)


@dataclass
class ServeConfig:
    redis_url: str
    collection: Path
    instance: str
    prefix: str = "helox."
    max_k: int = 16
    heartbeat_s: float = 2.0
    chunk_words: int = DEFAULT_CHUNK_WORDS
    reclaim_idle_ms: int = 30_000
    block_ms: int = 1000
    # model-ready: None key = retrieval only
    key: bytes | None = None
    prompt: str = "First Citizen:\n"
    runtime: Runtime = "onnx"
    max_new_tokens: int = 32
    from_start: bool = False
    allowed_root: str | None = None


class CyrexService:
    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.client = redis.Redis.from_url(cfg.redis_url)
        self.stop = threading.Event()
        self.status = "indexing"
        self.index: Bm25Index | None = None
        self.producer = Producer(service=RETRIEVER_NAME, instance=cfg.instance)
        self.failure: BaseException | None = None

    def stream(self, key: str) -> str:
        return TOPICS[key].stream(self.cfg.prefix)

    def publish(self, env: Any) -> None:
        topic = topic_for(env.payload)
        maxlen = topic.retention.maxlen
        self.client.xadd(topic.stream(self.cfg.prefix), entry_fields(env),
                         **({"maxlen": maxlen, "approximate": True} if maxlen else {}))

    # --- heartbeats ---------------------------------------------------------------------

    def heartbeat(self) -> RetrieverHeartbeat:
        index = self.index
        return RetrieverHeartbeat(
            name=RETRIEVER_NAME, instance=self.cfg.instance, version=__version__,
            index_digest=index.digest if index else EMPTY_DIGEST,
            index_chunks=len(index.chunks) if index else 0, index_documents=index.documents if index else 0,
            method="bm25", max_k=self.cfg.max_k, request_topic=REQUEST_TOPIC, status=self.status,  # type: ignore[arg-type]
            interval_s=self.cfg.heartbeat_s)

    def beat(self) -> None:
        self.publish(envelope(self.heartbeat(), producer=self.producer))

    def try_beat(self) -> None:
        try:
            self.beat()
        except redis.RedisError as exc:  # Redis away for a moment: the next beat will tell
            log("heartbeat failed", error=f"{type(exc).__name__}: {exc}")

    def _heartbeats(self) -> None:
        while not self.stop.wait(self.cfg.heartbeat_s):
            self.try_beat()

    # --- requests -----------------------------------------------------------------------

    def handle_request(self, entry_id: bytes, fields: dict[bytes, bytes]) -> str:
        """Answer or skip one entry of retrieval.requested; returns what was done. Never raises for
        a bad entry (Redis errors aside): the caller acks it either way."""
        eid = entry_id.decode()
        try:
            env = decode(read_body(fields), RetrievalRequested)
        except ValueError as exc:  # not a frame, not an envelope, another type, a bad payload
            log("malformed retrieval request: acked without an answer", entry=eid,
                reason=f"{type(exc).__name__}: {exc}")
            return "malformed"
        req = env.payload
        if req.retriever is not None and req.retriever != self.cfg.instance:
            log("retrieval request for another instance: skipped", entry=eid, request_id=req.request_id,
                retriever=req.retriever)
            return "other-instance"
        deadline = req.deadline if req.deadline.tzinfo else req.deadline.replace(tzinfo=UTC)
        if deadline < datetime.now(UTC):
            log("retrieval request past its deadline: skipped", entry=eid, request_id=req.request_id,
                deadline=deadline.isoformat(), requester=req.requester)
            return "expired"
        assert self.index is not None
        try:
            done = answer(req, self.index, max_k=self.cfg.max_k, instance=self.cfg.instance)
        except Exception as exc:  # a retriever bug: say so to the requester rather than stall it
            log("retrieval failed", entry=eid, request_id=req.request_id, error=f"{type(exc).__name__}: {exc}")
            done = RetrievalCompleted(request_id=req.request_id, retriever=RETRIEVER_NAME, instance=self.cfg.instance,
                                      index_digest=self.index.digest, results=[],
                                      error=f"retriever error: {type(exc).__name__}: {exc}")
        self.publish(envelope(done, producer=self.producer, run_id=env.run_id, causation_id=env.event_id,
                              correlation_id=env.correlation_id or env.event_id))
        log("retrieval request answered", entry=eid, request_id=req.request_id, queries=len(req.queries),
            elapsed_ms=round(done.elapsed_ms, 2))
        return "answered"

    def _handle_all(self, stream: str, entries: list[tuple[bytes, dict[bytes, bytes] | None]]) -> None:
        for entry_id, fields in entries:
            if fields:  # a pending entry trimmed away has no fields: only ack it
                self.handle_request(entry_id, fields)
            self.client.xack(stream, GROUP, entry_id)

    def serve_requests(self) -> None:
        """The request loop, until stop is set."""
        stream = self.stream(REQUEST_TOPIC)
        pending_first = True
        next_reclaim = time.monotonic() + self.cfg.reclaim_idle_ms / 1000
        while not self.stop.is_set():
            try:
                if pending_first:  # our own entries read before a crash, never acked
                    resp = self.client.xreadgroup(GROUP, self.cfg.instance, {stream: "0"}, count=100)
                    entries = resp[0][1] if resp else []
                    if not entries:
                        pending_first = False
                    self._handle_all(stream, entries)
                    continue
                if time.monotonic() >= next_reclaim:
                    self._reclaim(stream)
                    next_reclaim = time.monotonic() + self.cfg.reclaim_idle_ms / 1000
                resp = self.client.xreadgroup(GROUP, self.cfg.instance, {stream: ">"}, count=16,
                                              block=self.cfg.block_ms)
                self._handle_all(stream, resp[0][1] if resp else [])
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log("consumer group gone (Redis restarted empty?): recreating it", stream=stream)
                ensure_group(self.client, stream, "0")
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log("redis unavailable, retrying", error=f"{type(exc).__name__}: {exc}")
                self.stop.wait(1.0)

    def _reclaim(self, stream: str) -> None:
        """Take over entries another consumer of the group left pending for reclaim_idle_ms."""
        start = "0-0"
        while True:
            resp = self.client.xautoclaim(stream, GROUP, self.cfg.instance, self.cfg.reclaim_idle_ms,
                                          start_id=start, count=50)
            start, entries = resp[0], resp[1]
            if entries:
                log("reclaimed stale retrieval requests", count=len(entries))
                self._handle_all(stream, entries)
            if start in (b"0-0", "0-0") or not entries:
                return

    # --- models -------------------------------------------------------------------------

    def _models(self) -> None:
        assert self.cfg.key is not None
        client = redis.Redis.from_url(self.cfg.redis_url)
        while not self.stop.is_set():
            try:
                run_model_ready(client, self.stream("export.model-ready"), self.cfg.key, prompt=self.cfg.prompt,
                                consumer=self.cfg.instance, runtime=self.cfg.runtime,
                                max_new_tokens=self.cfg.max_new_tokens,
                                start_id="0" if self.cfg.from_start else "$", block_ms=self.cfg.block_ms,
                                allowed_root=self.cfg.allowed_root, index=self.index, max_k=self.cfg.max_k,
                                stop=self.stop)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log("redis unavailable, retrying", error=f"{type(exc).__name__}: {exc}")
                self.stop.wait(1.0)

    def _guarded(self, target: Any) -> Any:
        def go() -> None:
            try:
                target()
            except BaseException as exc:  # a thread that dies ends the process: the supervisor restarts it
                self.failure = exc
                log("cyrex thread failed", thread=target.__name__, error=f"{type(exc).__name__}: {exc}")
                self.stop.set()
        return go

    # --- the whole process --------------------------------------------------------------

    def run(self) -> int:
        log("cyrex starting", instance=self.cfg.instance, collection=str(self.cfg.collection), version=__version__)
        self.try_beat()  # `indexing`, before the index exists
        beats = threading.Thread(target=self._guarded(self._heartbeats), name="heartbeats", daemon=True)
        beats.start()
        started = time.perf_counter()
        collection = read_collection(self.cfg.collection, self.cfg.chunk_words)
        self.index = Bm25Index(collection)
        if not collection.chunks:
            log("the collection has no documents: every query will get no chunks", collection=str(collection.root),
                suffixes=".txt .md .py .jsonl", skipped=collection.skipped)
        ensure_group(self.client, self.stream(REQUEST_TOPIC), "$")
        self.status = "ready"
        log("index ready", digest=self.index.digest, chunks=len(collection.chunks), documents=collection.documents,
            files=collection.files, skipped=collection.skipped, seconds=round(time.perf_counter() - started, 2))
        self.try_beat()  # announce `ready` at once, not at the next tick
        models = None
        if self.cfg.key is not None:
            models = threading.Thread(target=self._guarded(self._models), name="models", daemon=True)
            models.start()
        try:
            self._guarded(self.serve_requests)()
        finally:
            self.stop.set()
            self.status = "stopping"
            beats.join(timeout=5)
            self.try_beat()
            if models is not None:
                models.join(timeout=self.cfg.block_ms / 1000 + 5)
        log("cyrex stopped", instance=self.cfg.instance)
        return 1 if self.failure is not None else 0


def serve(cfg: ServeConfig) -> int:
    """Run the service until SIGTERM/SIGINT; exit code 0, or 1 when a thread failed."""
    service = CyrexService(cfg)

    def on_signal(signum: int, _frame: Any) -> None:
        log("signal received: stopping", signal=signal.Signals(signum).name)
        service.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return service.run()
