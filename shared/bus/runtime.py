"""The bus runtime every Helox service shares: FastStream's RedisBroker on Redis Streams.

Publishing fills the envelope (producer, ids, causation from the event being handled)
and trims telemetry streams per the topic's policy. Consuming uses consumer groups with
stable consumer names; an entry is acked only after its handler succeeds.

Per subscription there are two FastStream subscribers on the same group and consumer:
- a reader (XREADGROUP >) for new entries;
- a reclaimer (FastStream's `min_idle_time`, i.e. XAUTOCLAIM) for entries left pending
  by a dead instance, or by a failed delivery, for longer than `reclaim_idle_ms`.
While a handler runs, its entry's idle time is reset every `keepalive` seconds
(XCLAIM ... JUSTID to itself) so that the reclaim timeout can stay short.

An entry that cannot be decoded, has an unknown major version or an invalid payload goes
to the dead-letter stream at once; one whose handler fails `max_deliveries` times goes
there too. Either way it is then acked: one bad message never stalls a consumer.
FastStream reads an entry in two steps before any handler: its parser (entry -> message)
and its decoder (body -> object by content-type); an exception in either comes before its
ack logic and would leave the entry pending forever. Every subscriber the Bus registers
therefore gets a parser that cannot fail (`_tolerant_parser`) and a decoder that does not
decode (`_raw_decoder`): the Bus reads the entry itself (`wire.read_entry`, `codec.decode`),
so every fault reaches `_process` and is dead-lettered with a reason.

If Redis comes back empty, reads fail with NOGROUP and FastStream stops the subscriber;
a watchdog recreates the group and starts it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import faststream.redis.subscriber.usecases.basic as _fs_basic
import faststream.redis.subscriber.usecases.stream_subscriber as _fs_stream
from faststream.exceptions import SkipMessage
from faststream.redis import RedisBroker, StreamSub
from faststream.redis.annotations import RedisBatchStreamMessage, RedisStreamMessage
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from contracts import DeadLetter, Envelope, Event, Producer, topic_for
from contracts.codec import (
    DecodeError,
    SchemaVersionError,
    decode,
    describe,
    encode_new,
    envelope,
)
from shared.config import HeloxSettings
from shared.logging import bound, get_logger, quiet_faststream_fetch_errors

from .wire import DATA_FIELD, WireError, dead_letter_fields, encode_entry, entry, read_entry

# FastStream waits 5 s after a failed read before trying again; a restarted Redis should
# be picked up within about a second.
_fs_basic.CONSUME_ERROR_BACKOFF_SECONDS = 1
_fs_stream.CONSUME_ERROR_BACKOFF_SECONDS = 1

P = TypeVar("P", bound=Event)
log = get_logger("helox.bus")

CURRENT_EVENT: ContextVar[Envelope[Any] | None] = ContextVar("helox_current_event", default=None)
"""The envelope being handled in this task: publish() takes causation and run_id from it."""


class Requeue(Exception):
    """Raised by a handler to leave its entry pending without counting a failure: e.g. a
    trainer stopped by SIGTERM after checkpointing, so that the next instance (or this
    one restarted) resumes the job. The entry is reclaimed after `reclaim_idle_ms`."""


@dataclass(frozen=True)
class Delivery:
    """Where a handled entry came from."""

    stream: str
    entry_id: str
    group: str
    consumer: str
    delivery_count: int


Handler = Callable[[Envelope[P], Delivery], Awaitable[None]]


@dataclass
class _Subscription(Generic[P]):
    payload: type[P]
    stream: str
    group: str
    handler: Handler[P]
    reader: Any = None
    reclaimer: Any = None
    handled: int = 0
    dead_lettered: int = 0


@dataclass
class BusStats:
    published: int = 0
    handled: int = 0
    failed: int = 0
    dead_lettered: int = 0
    groups_recreated: int = 0


class Bus:
    """One service instance's connection to Synapse (the Helox event bus)."""

    def __init__(self, settings: HeloxSettings, service: str, *, instance: str | None = None) -> None:
        if not settings.redis_url:
            raise ValueError("HELOX_REDIS_URL is not set: start Redis (`helox up` embeds one) or set it")
        self.settings = settings
        self.service = service
        self.instance = instance or settings.instance_name(service)
        self.producer = Producer(service=service, instance=self.instance)
        self.prefix = settings.topic_prefix
        self.url = settings.redis_url
        self.broker = RedisBroker(self.url, **_broker_kwargs(settings))
        quiet_faststream_fetch_errors()
        self._subs: list[_Subscription[Any]] = []
        self._routes: dict[type[Event], tuple[str, int | None]] = {}
        self._producer_json = self.producer.model_dump_json().encode()
        self._watchdog: asyncio.Task[None] | None = None
        self._running = False
        self.stats = BusStats()
        self.busy: dict[str, str] = {}
        """entry id -> description of the handler running it (for heartbeats)."""

    # --- names ------------------------------------------------------------------------

    def stream(self, payload: type[Event] | Event) -> str:
        return topic_for(payload).stream(self.prefix)

    @property
    def redis(self) -> Redis:
        """The broker's redis-py client (connected after start())."""
        return self.broker.config.connection.client

    # --- lifecycle ----------------------------------------------------------------------

    async def connect(self) -> None:
        await self.broker.connect()

    async def start(self) -> None:
        await self.broker.connect()
        for sub in self._subs:
            await self.ensure_group(sub.stream, sub.group)
        await self.broker.start()
        self._running = True
        self._watchdog = asyncio.create_task(self._watch_subscribers(), name="helox-bus-watchdog")

    async def stop(self) -> None:
        """Stop consuming; an in-flight handler finishes (acked) or its entry stays pending."""
        self._running = False
        if self._watchdog:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        await self.broker.stop()

    async def __aenter__(self) -> Bus:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def ensure_group(self, stream: str, group: str) -> bool:
        """Create the group at the stream's start (MKSTREAM); True when it was created."""
        try:
            await self.redis.xgroup_create(stream, group, id="0", mkstream=True)
            return True
        except ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise

    # --- publishing ---------------------------------------------------------------------

    def envelope(
        self,
        payload: P,
        *,
        run_id: str | None = None,
        cause: Envelope[Any] | None = None,
    ) -> Envelope[P]:
        """A new envelope; causation, correlation and run_id default to the event being handled."""
        cause = cause if cause is not None else CURRENT_EVENT.get()
        return envelope(
            payload,
            producer=self.producer,
            run_id=run_id if run_id is not None else (cause.run_id if cause else None),
            causation_id=cause.event_id if cause else None,
            correlation_id=(cause.correlation_id or cause.event_id) if cause else None,
        )

    async def publish(
        self, payload: P, *, run_id: str | None = None, cause: Envelope[Any] | None = None
    ) -> Envelope[P]:
        env = self.envelope(payload, run_id=run_id, cause=cause)
        await self.publish_envelope(env)
        return env

    async def publish_envelope(self, env: Envelope[Any]) -> str:
        topic = topic_for(env.payload)
        entry_id = await self.redis.xadd(
            topic.stream(self.prefix),
            encode_entry(env),
            maxlen=topic.retention.maxlen,
            approximate=True,
        )
        self.stats.published += 1
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def publish_many(
        self, payloads: Sequence[Event], *, run_id: str | None = None, cause: Envelope[Any] | None = None
    ) -> list[uuid.UUID]:
        """Publish a batch in one round trip, in order; returns the new event ids.

        The fast path for bursts: envelopes are written straight to JSON (no Envelope
        objects) and the XADDs packed into one write on a pooled connection."""
        cause = cause if cause is not None else CURRENT_EVENT.get()
        run = run_id if run_id is not None else (cause.run_id if cause else None)
        causation = cause.event_id if cause else None
        correlation = (cause.correlation_id or cause.event_id) if cause else None
        ids: list[uuid.UUID] = []
        cmds = []
        for payload in payloads:
            stream, maxlen = self._route(type(payload))
            event_id, body = encode_new(
                payload, producer_json=self._producer_json, run_id=run,
                causation_id=causation, correlation_id=correlation,
            )
            eid = str(event_id)
            fields = entry(body, eid, str(correlation) if correlation else eid, payload.EVENT_TYPE)
            trim = ("MAXLEN", "~", maxlen) if maxlen else ()
            cmds.append(("XADD", stream, *trim, "*", *_flat(fields)))
            ids.append(event_id)
        pool = self.redis.connection_pool
        conn = await pool.get_connection()
        try:
            # redis-py's asyncio connections pack commands in Python even with hiredis
            # installed; hiredis' packer is several times faster.
            packed = b"".join(map(_pack, cmds)) if _pack else conn.pack_commands(cmds)
            # One deadline for the batch instead of a timeout context per reply.
            async with asyncio.timeout(self.settings.redis_socket_timeout_s):
                await conn.send_packed_command(packed)
                for _ in cmds:
                    reply = await conn.read_response(timeout=math.inf)
                    if isinstance(reply, ResponseError):
                        raise reply
        except BaseException:
            await conn.disconnect()  # a half-read connection must not go back to the pool
            raise
        finally:
            await pool.release(conn)
        self.stats.published += len(ids)
        return ids

    def _route(self, payload: type[Event]) -> tuple[str, int | None]:
        route = self._routes.get(payload)
        if route is None:
            topic = topic_for(payload)
            route = self._routes[payload] = (topic.stream(self.prefix), topic.retention.maxlen)
        return route

    # --- consuming ----------------------------------------------------------------------

    def subscribe(
        self,
        payload: type[P],
        handler: Handler[P],
        *,
        group: str | None = None,
        max_records: int = 1,
    ) -> None:
        """Register `handler(envelope, delivery)` for a topic in consumer group `group`
        (default: the service name, so instances of one service share the work).

        `max_records > 1` reads new entries in batches (for high-rate telemetry such as
        train.metrics); keep 1 for long handlers, so entries do not wait unclaimed behind
        one another."""
        if self._running:
            raise RuntimeError("subscribe() before start()")
        sub = _Subscription(payload=payload, stream=self.stream(payload), group=group or self.service, handler=handler)
        poll = self.settings.polling_interval_ms

        async def on_new(message: RedisStreamMessage) -> None:
            await self._dispatch(sub, message, reclaimed=False)

        async def on_new_batch(message: RedisBatchStreamMessage) -> None:
            await self._dispatch_batch(sub, message)

        async def on_reclaimed(message: RedisStreamMessage) -> None:
            await self._dispatch(sub, message, reclaimed=True)

        batch = max_records > 1
        sub.reader = self.broker.subscriber(
            stream=StreamSub(
                sub.stream, group=sub.group, consumer=self.instance, polling_interval=poll,
                max_records=max_records, batch=batch,
            ),
            parser=_tolerant_batch_parser if batch else _tolerant_parser,
            decoder=_raw_decoder,
        )
        sub.reader(on_new_batch if batch else on_new)
        sub.reclaimer = self.broker.subscriber(
            stream=StreamSub(
                sub.stream,
                group=sub.group,
                consumer=self.instance,
                polling_interval=max(poll, 200),
                min_idle_time=self.settings.reclaim_idle_ms,
            ),
            parser=_tolerant_parser,
            decoder=_raw_decoder,
        )
        sub.reclaimer(on_reclaimed)
        self._subs.append(sub)

    def handler(self, payload: type[P], *, group: str | None = None) -> Callable[[Handler[P]], Handler[P]]:
        """Decorator form of subscribe()."""

        def deco(fn: Handler[P]) -> Handler[P]:
            self.subscribe(payload, fn, group=group)
            return fn

        return deco

    async def _dispatch(self, sub: _Subscription[Any], message: Any, *, reclaimed: bool) -> None:
        """One entry (FastStream acks it when this returns; raising leaves it pending)."""
        raw = message.raw_message
        entry_id = raw["message_ids"][0]
        if reclaimed and _s(entry_id) in self.busy:
            # Our own reclaimer took back an entry this process is still handling (its
            # keepalive was late, e.g. a starved event loop): never run it twice here.
            raise _HandlerFailed(_s(entry_id))
        fields: dict[bytes, bytes] = raw.get(_RAW_FIELDS) or raw["data"]
        count = await self._delivery_count(sub, entry_id) if reclaimed else 1
        if not await self._process(sub, _s(entry_id), fields, count):
            raise _HandlerFailed(_s(entry_id))

    async def _dispatch_batch(self, sub: _Subscription[Any], message: Any) -> None:
        """A batch of new entries, handled in order. Entries that succeed (or are
        dead-lettered) are acked at once; if any failed, raising keeps FastStream from
        acking the batch, so the failed ones stay pending for redelivery."""
        raw = message.raw_message
        ids = [_s(i) for i in raw["message_ids"]]
        done: list[str] = []
        failed = False
        for entry_id, fields in zip(ids, raw.get(_RAW_FIELDS) or raw["data"], strict=True):
            if await self._process(sub, entry_id, fields, 1, keepalive=len(ids) == 1):
                done.append(entry_id)
            else:
                failed = True
        if failed:
            if done:
                await self.redis.xack(sub.stream, sub.group, *done)
            raise _HandlerFailed(",".join(i for i in ids if i not in done))

    async def _process(
        self, sub: _Subscription[Any], entry_id: str, fields: dict[bytes, bytes], count: int, *, keepalive: bool = True
    ) -> bool:
        """Decode, run the handler; True when the entry may be acked (handled or dead-lettered)."""
        delivery = Delivery(sub.stream, entry_id, sub.group, self.instance, count)
        try:
            body, _headers = read_entry(fields)
            env = decode(body, sub.payload)
        except (WireError, DecodeError) as exc:
            await self.dead_letter(delivery, fields, exc, "decode")
            return True
        except SchemaVersionError as exc:
            await self.dead_letter(delivery, fields, exc, "version")
            return True
        except ValidationError as exc:
            why = f"the {sub.payload.EVENT_TYPE} payload does not match its schema: {describe(exc)}"
            await self.dead_letter(delivery, fields, ValueError(why), "schema", event_type=sub.payload.EVENT_TYPE)
            return True

        token = CURRENT_EVENT.set(env)
        self.busy[entry_id] = f"{env.type} {env.run_id or ''}".strip()
        claim = asyncio.create_task(self._keep_claim(delivery)) if keepalive else None
        try:
            with bound(run_id=env.run_id, event_id=str(env.event_id), event_type=env.type):
                await sub.handler(env, delivery)
        except asyncio.CancelledError:
            raise  # shutting down: leave it pending for another instance
        except Requeue as exc:
            log.info("handler handed its entry back", stream=sub.stream, entry_id=entry_id, reason=str(exc))
            return False
        except Exception as exc:
            self.stats.failed += 1
            if count >= self.settings.max_deliveries:
                await self.dead_letter(delivery, fields, exc, type(exc).__name__, event_type=env.type)
                return True
            log.warning(
                "handler failed; entry stays pending for redelivery",
                stream=sub.stream, entry_id=entry_id, delivery=count,
                max_deliveries=self.settings.max_deliveries, error=repr(exc), exc_info=exc,
            )
            return False
        finally:
            if claim:
                claim.cancel()
            self.busy.pop(entry_id, None)
            CURRENT_EVENT.reset(token)
        sub.handled += 1
        self.stats.handled += 1
        return True

    async def _delivery_count(self, sub: _Subscription[Any], entry_id: bytes) -> int:
        rows = await self.redis.xpending_range(sub.stream, sub.group, min=entry_id, max=entry_id, count=1)
        return int(rows[0]["times_delivered"]) if rows else 1

    async def _keep_claim(self, d: Delivery) -> None:
        """Reset the entry's idle time while its handler runs, so nobody reclaims it."""
        interval = self.settings.reclaim_keepalive_s()
        while True:
            await asyncio.sleep(interval)
            try:
                await self.redis.xclaim(d.stream, d.group, d.consumer, 0, [d.entry_id], justid=True)
            except Exception as exc:  # Redis hiccup: the next tick tries again
                log.warning("claim keepalive failed", stream=d.stream, entry_id=d.entry_id, error=repr(exc))

    async def dead_letter(
        self,
        d: Delivery,
        fields: dict[bytes, bytes],
        exc: BaseException,
        error_type: str,
        *,
        event_type: str | None = None,
    ) -> None:
        """Record the entry in the dead-letter stream (the caller's return then acks it)."""
        letter = DeadLetter(
            original_stream=d.stream,
            original_id=d.entry_id,
            original_fields=dead_letter_fields(fields),
            error=str(exc)[:4000],
            error_type=error_type,
            group=d.group,
            consumer=d.consumer,
            delivery_count=d.delivery_count,
            event_type=event_type,
        )
        await self.publish(letter, cause=CURRENT_EVENT.get())
        self.stats.dead_lettered += 1
        log.error("dead-lettered", stream=d.stream, entry_id=d.entry_id, error_type=error_type, error=str(exc)[:300])

    # --- NOGROUP recovery ---------------------------------------------------------------

    async def _watch_subscribers(self) -> None:
        while self._running:
            await asyncio.sleep(0.5)
            for sub in self._subs:
                for fs_sub in (sub.reader, sub.reclaimer):
                    if fs_sub.running or not self._running:
                        continue
                    try:
                        created = await self.ensure_group(sub.stream, sub.group)
                        await fs_sub.start()
                        self.stats.groups_recreated += int(created)
                        log.warning("subscriber restarted", stream=sub.stream, group=sub.group, group_recreated=created)
                    except Exception as exc:
                        log.warning("subscriber restart failed; retrying", stream=sub.stream, error=repr(exc))


try:
    from hiredis import pack_command as _pack
except ImportError:  # pragma: no cover - hiredis is a dependency; keep working without it
    _pack = None


def _flat(fields: dict[bytes, bytes]) -> tuple[bytes, ...]:
    return tuple(x for kv in fields.items() for x in kv)


_RAW_FIELDS = "helox_raw_fields"


async def _tolerant_parser(msg: Any, original: Callable[[Any], Awaitable[Any]]) -> Any:
    """FastStream's parser chokes on entries that are not its format (say, an entry with no
    __data__ and non-UTF-8 fields, which it tries to dump as JSON) and then never acks them.
    Hand such entries to the handler with an empty body instead, keeping the raw fields, so
    they reach the dead-letter stream like any bad message."""
    try:
        return await original(msg)
    except Exception:
        patched = dict(msg)
        patched[_RAW_FIELDS] = msg["data"]
        patched["data"] = {DATA_FIELD: b""}
        return await original(patched)


async def _tolerant_batch_parser(msg: Any, original: Callable[[Any], Awaitable[Any]]) -> Any:
    """The batch form of _tolerant_parser: unreadable entries become empty bodies."""
    try:
        return await original(msg)
    except Exception:
        patched = dict(msg)
        patched[_RAW_FIELDS] = msg["data"]
        patched["data"] = [{DATA_FIELD: b""} for _ in msg["data"]]
        return await original(patched)


async def _raw_decoder(msg: Any) -> Any:
    """The decoder of every Bus subscriber: the body as it is. FastStream's decoder parses
    a JSON-typed body and raises for one that is not JSON (or not UTF-8) before the handler
    and its ack; the Bus decodes entries itself (`_process`), so nothing may fail here."""
    return msg.body


class _HandlerFailed(SkipMessage):
    """Raised to FastStream so it leaves the entry (or batch) pending, neither acked nor logged
    again (a SkipMessage: we logged the cause already)."""


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _broker_kwargs(settings: HeloxSettings) -> dict[str, Any]:
    """Timeouts longer than a blocking read; TLS options (e.g. ssl_ca_certs) travel in the URL's query."""
    return {
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": min(settings.redis_socket_timeout_s, 5.0),
        "log_level": logging.DEBUG,  # per-message Received/Processed lines are debug noise
    }

