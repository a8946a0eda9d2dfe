"""A never-blocking publisher for producers that must not wait on Redis (the trainer's loop).

`publish()` builds the envelope and appends it to an in-memory queue: microseconds. A
background thread sends queued events in pipelined batches, each batch inside
MULTI/EXEC together with a per-outbox sequence marker (``helox:outbox:<service>:<id>`` for the default prefix).

While Redis is unreachable, events spill to an append-only file (one JSON line each, in
order). When Redis returns, the file is replayed in order; the sequence marker tells
which events the last, interrupted, batch had already delivered, so nothing is sent
twice; then the file is truncated. A file left behind by a crashed process is replayed
by the next outbox that opens the same spill directory.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from contracts import Envelope, Event, Producer, topic_for
from contracts.codec import envelope as make_envelope
from contracts.topics import marker_prefix
from shared.logging import get_logger

from .wire import encode_entry

log = get_logger("helox.outbox")

MARKER_TTL_S = 7 * 24 * 3600


@dataclass
class _Item:
    seq: int
    stream: str
    maxlen: int | None
    env: Envelope[Any] | None = None
    fields: dict[bytes, bytes] | None = None

    def encoded(self) -> dict[bytes, bytes]:
        if self.fields is None:
            assert self.env is not None
            self.fields = encode_entry(self.env)
        return self.fields


class Outbox:
    """In-memory queue + spill file + background sender. Thread-safe `publish`."""

    def __init__(
        self,
        redis_url: str,
        *,
        producer: Producer,
        spill_dir: str | os.PathLike[str],
        prefix: str = "helox.",
        batch_max: int = 500,
        redis_options: dict[str, Any] | None = None,
    ) -> None:
        self.producer = producer
        self.prefix = prefix
        self.batch_max = batch_max
        self.outbox_id = uuid.uuid4().hex[:12]
        self.spill_dir = Path(spill_dir)
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        self.spill_path = self.spill_dir / f"outbox-{producer.service}-{self.outbox_id}.jsonl"
        opts = {"socket_timeout": 2.0, "socket_connect_timeout": 1.0, **(redis_options or {})}
        self._redis = redis.Redis.from_url(redis_url, **opts)
        self._queue: deque[_Item] = deque()
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stop = False
        self._spilling = False
        self._spill_file: Any = None
        self.sent = 0
        self.spilled = 0
        self.replayed = 0
        self._thread = threading.Thread(target=self._run, name="helox-outbox", daemon=True)
        self._thread.start()

    # --- producer side ------------------------------------------------------------------

    def publish(
        self,
        payload: Event,
        *,
        run_id: str | None = None,
        causation_id: uuid.UUID | None = None,
        correlation_id: uuid.UUID | None = None,
    ) -> Envelope[Any]:
        """Queue an event; returns its envelope at once. Never blocks on Redis."""
        env = make_envelope(
            payload, producer=self.producer, run_id=run_id, causation_id=causation_id, correlation_id=correlation_id
        )
        topic = topic_for(payload)
        with self._seq_lock:
            self._seq += 1
            self._queue.append(_Item(self._seq, topic.stream(self.prefix), topic.retention.maxlen, env))
        self._idle.clear()
        self._wake.set()
        return env

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued event is in Redis (False on timeout, e.g. Redis still down)."""
        self._wake.set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._idle.wait(0.05) and not self._queue and not self._spilling:
                return True
            self._wake.set()
        return False

    @property
    def pending(self) -> int:
        return len(self._queue)

    def close(self, timeout: float = 10.0) -> bool:
        """Flush what can be flushed, then stop; unsent events stay in the spill file."""
        ok = self.flush(timeout)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)
        if not ok:
            # Whatever is still queued goes to the file so the next outbox sends it.
            self._spill(self._drain(len(self._queue)))
        if self._spill_file:
            self._spill_file.close()
        self._redis.close()
        return ok

    # --- sender thread ------------------------------------------------------------------

    def _run(self) -> None:
        self._replay_leftovers()
        backoff = 0.05
        while not self._stop:
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                if self._spilling:
                    self._replay_spill()
                while self._queue and not self._stop:
                    batch = self._drain(self.batch_max)
                    try:
                        self._send(batch)
                    except redis.RedisError:
                        self._spill(batch)
                        raise
                backoff = 0.05
            except redis.RedisError as exc:
                self._spilling = True
                # Anything queued meanwhile must follow the spilled events, in order.
                self._spill(self._drain(len(self._queue)))
                log.warning("redis unreachable; outbox spilling to disk", file=str(self.spill_path), error=repr(exc))
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                self._wake.set()
                continue
            if not self._queue and not self._spilling:
                self._idle.set()

    def _drain(self, n: int) -> list[_Item]:
        out = []
        while self._queue and len(out) < n:
            out.append(self._queue.popleft())
        return out

    def _marker(self, outbox_id: str) -> str:
        return f"{marker_prefix(self.prefix)}outbox:{self.producer.service}:{outbox_id}"

    def _send(self, batch: Iterable[_Item], outbox_id: str | None = None) -> None:
        items = list(batch)
        if not items:
            return
        pipe = self._redis.pipeline(transaction=True)
        for item in items:
            pipe.xadd(item.stream, item.encoded(), maxlen=item.maxlen, approximate=True)
        pipe.set(self._marker(outbox_id or self.outbox_id), items[-1].seq, ex=MARKER_TTL_S)
        pipe.execute()
        self.sent += len(items)

    # --- spill file ---------------------------------------------------------------------

    def _spill(self, items: list[_Item]) -> None:
        if not items:
            return
        if self._spill_file is None:
            self._spill_file = open(self.spill_path, "a", encoding="utf-8")  # noqa: SIM115
        for item in items:
            fields = {k.decode(): base64.b64encode(v).decode() for k, v in item.encoded().items()}
            rec = {"outbox": self.outbox_id, "seq": item.seq, "stream": item.stream, "maxlen": item.maxlen, "fields": fields}
            self._spill_file.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self._spill_file.flush()
        os.fsync(self._spill_file.fileno())
        self.spilled += len(items)

    def _replay_spill(self) -> None:
        """Send the spill file in order (skipping what already arrived), then truncate it."""
        if self._spill_file is not None:
            self._spill_file.flush()
        self._replay_file(self.spill_path)
        if self._spill_file is not None:
            self._spill_file.seek(0)
            self._spill_file.truncate()
        self._spilling = False
        log.info("redis back; outbox spill replayed", replayed=self.replayed)

    def _replay_leftovers(self) -> None:
        """Files left by earlier processes of this service are sent before anything new."""
        for path in sorted(self.spill_dir.glob(f"outbox-{self.producer.service}-*.jsonl")):
            if path == self.spill_path:
                continue
            try:
                self._replay_file(path)
                path.unlink()
            except redis.RedisError:
                log.warning("cannot replay leftover outbox file yet; will retry at next start", file=str(path))
                return

    def _replay_file(self, path: Path) -> None:
        if not path.exists():
            return
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        by_outbox: dict[str, list[dict[str, Any]]] = {}
        for rec in records:
            by_outbox.setdefault(rec["outbox"], []).append(rec)
        for outbox_id, recs in by_outbox.items():
            done = int(self._redis.get(self._marker(outbox_id)) or 0)
            todo = [
                _Item(
                    r["seq"], r["stream"], r["maxlen"],
                    fields={k.encode(): base64.b64decode(v) for k, v in r["fields"].items()},
                )
                for r in recs
                if r["seq"] > done
            ]
            for i in range(0, len(todo), self.batch_max):
                self._send(todo[i : i + self.batch_max], outbox_id=outbox_id)
            self.replayed += len(todo)
