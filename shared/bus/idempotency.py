"""Exactly-once effects on top of at-least-once delivery.

A handler marks a key (an event id, or the digest of the artifact it produces) as done
*after* its effect is durable. A redelivered event whose key is done is skipped. When the
effect itself is a Redis write, put it in the same MULTI/EXEC as the marker
(`commit(key, pipe=...)`) and the pair is atomic; a file effect should be written
atomically under a name derived from the key, so that redoing it is harmless.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from contracts import DEFAULT_PREFIX, Envelope
from contracts.topics import marker_prefix

from .runtime import Delivery

T = TypeVar("T")
DEFAULT_TTL_S = 30 * 24 * 3600


class Idempotency:
    """Done-markers in Redis under ``<deployment>:idem:<namespace>:<key>`` (``helox:idem:…``)."""

    def __init__(self, redis: Redis, namespace: str, *, prefix: str = DEFAULT_PREFIX, ttl_s: int = DEFAULT_TTL_S) -> None:
        self.redis = redis
        self.namespace = namespace
        self.base = f"{marker_prefix(prefix)}idem:{namespace}:"
        self.ttl_s = ttl_s

    def key(self, key: str) -> str:
        return self.base + key

    async def result(self, key: str) -> str | None:
        """The recorded result of a finished key, or None if it was never committed."""
        value = await self.redis.get(self.key(key))
        return value.decode() if isinstance(value, bytes) else value

    async def seen(self, key: str) -> bool:
        return bool(await self.redis.exists(self.key(key)))

    def transaction(self) -> Pipeline:
        """A MULTI/EXEC pipeline: queue the effect's writes, then pass it to commit()."""
        return self.redis.pipeline(transaction=True)

    async def commit(self, key: str, result: str = "1", *, pipe: Pipeline | None = None) -> None:
        """Mark `key` done (with its result); with `pipe`, atomically with the queued effect."""
        if pipe is None:
            await self.redis.set(self.key(key), result, ex=self.ttl_s)
            return
        pipe.set(self.key(key), result, ex=self.ttl_s)
        await pipe.execute()


def idempotent(
    idem: Idempotency | Callable[[], Idempotency],
    key: Callable[[Envelope[Any]], str] = lambda env: str(env.event_id),
) -> Callable[
    [Callable[[Envelope[Any], Delivery], Awaitable[None]]], Callable[[Envelope[Any], Delivery], Awaitable[None]]
]:
    """Decorate a handler so an event whose key is done is skipped, and done once it returns."""

    def deco(fn: Callable[[Envelope[Any], Delivery], Awaitable[None]]) -> Callable[[Envelope[Any], Delivery], Awaitable[None]]:
        @functools.wraps(fn)
        async def wrapper(env: Envelope[Any], delivery: Delivery) -> None:
            store = idem() if callable(idem) and not isinstance(idem, Idempotency) else idem
            k = key(env)
            if await store.seen(k):
                return
            await fn(env, delivery)
            await store.commit(k)

        return wrapper

    return deco
