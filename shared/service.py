"""What every service process shares: settings, logging, the bus, heartbeats, graceful stop.

A service's `app.py` only wires topics to functions:

    def setup(rt: ServiceRuntime) -> None:
        rt.bus.subscribe(DatasetReady, on_dataset_ready)

and its `__main__` calls `run_service("trainer", setup)`.

SIGTERM/SIGINT: the instance reports `stopping`, stops reading, lets the handler in hand
finish (acked) or, if it is cancelled, leaves its entry pending for another instance
(never half-acked), runs shutdown hooks and exits 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

from contracts import ServiceHeartbeat
from shared.allocator import keep_freed_memory
from shared.artifacts import ArtifactStore
from shared.bus import Bus
from shared.bus.idempotency import Idempotency
from shared.config import ConfigError, HeloxSettings, load_settings
from shared.logging import configure_logging, get_logger
from shared.version import __version__

log = get_logger("helox.service")

Hook = Callable[["ServiceRuntime"], Awaitable[None] | None]


class ServiceRuntime:
    """One running instance of a service."""

    def __init__(self, service: str, settings: HeloxSettings) -> None:
        self.service = service
        self.settings = settings
        self.bus = Bus(settings, service)
        self.instance = self.bus.instance
        # The one construction of a service's store: a directory or s3://bucket/prefix (HELOX_ARTIFACTS),
        # with its S3 endpoint and credentials (HELOX_S3_*), staging area and cache under the state dir.
        self.store = ArtifactStore.from_settings(settings)
        self.started_at = datetime.now(UTC)
        self.status: str = "starting"
        self.current_work: str | None = None
        self.stopping = asyncio.Event()
        self._startup: list[Hook] = []
        self._shutdown: list[Hook] = []
        self._stop_requested: list[Callable[[ServiceRuntime], None]] = []
        self._idem: Idempotency | None = None
        self.state: dict[str, Any] = {}
        """Service-specific state set up by its hooks."""

    @property
    def idempotency(self) -> Idempotency:
        if self._idem is None:
            self._idem = Idempotency(self.bus.redis, self.service, prefix=self.bus.prefix)
        return self._idem

    def on_startup(self, hook: Hook) -> Hook:
        self._startup.append(hook)
        return hook

    def on_shutdown(self, hook: Hook) -> Hook:
        self._shutdown.append(hook)
        return hook

    def on_stop_requested(self, hook: Callable[[ServiceRuntime], None]) -> None:
        """Called at once (on the loop) when SIGTERM/SIGINT arrives, before the bus stops:
        for work that must wind down first (a training job checkpoints and stops)."""
        self._stop_requested.append(hook)

    def heartbeat(self) -> ServiceHeartbeat:
        busy = list(self.bus.busy.values())
        work = self.current_work or (", ".join(busy) if busy else None)
        status = self.status if self.status in ("starting", "stopping") else ("busy" if work else "idle")
        return ServiceHeartbeat(
            service=self.service,
            instance=self.instance,
            pid=os.getpid(),
            host=socket.gethostname(),
            version=__version__,
            status=status,  # type: ignore[arg-type]
            current_work=work,
            started_at=self.started_at,
            interval_s=self.settings.heartbeat_interval_s,
        )

    async def send_heartbeat(self) -> None:
        try:
            await self.bus.publish(self.heartbeat(), cause=None)
        except Exception as exc:  # Redis down: the bus reconnects, the next beat goes out
            log.warning("heartbeat failed", error=repr(exc))

    async def _heartbeats(self) -> None:
        while not self.stopping.is_set():
            await self.send_heartbeat()
            try:
                await asyncio.wait_for(self.stopping.wait(), self.settings.heartbeat_interval_s)
            except TimeoutError:
                pass

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig)
        await self.bus.connect()
        for hook in self._startup:
            result = hook(self)
            if asyncio.iscoroutine(result):
                await result
        await self.bus.start()
        self.status = "idle"
        beats = asyncio.create_task(self._heartbeats(), name="heartbeats")
        log.info("service started", redis=_redacted(self.settings.redis_url or ""), prefix=self.bus.prefix)
        await self.stopping.wait()
        self.status = "stopping"
        await self.send_heartbeat()
        await self.bus.stop()
        for hook in self._shutdown:
            result = hook(self)
            if asyncio.iscoroutine(result):
                await result
        beats.cancel()
        log.info("service stopped", handled=self.bus.stats.handled, dead_lettered=self.bus.stats.dead_lettered)

    def request_stop(self, sig: int | None = None) -> None:
        if not self.stopping.is_set():
            log.info("stop requested", signal=signal.Signals(sig).name if sig else None)
            for hook in self._stop_requested:
                hook(self)
            self.stopping.set()


def _redacted(url: str) -> str:
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


DEV_SECRET_PREFIX = "helox-dev-"
"""The committed development secrets (docker-compose.yml's default Redis passwords, which the
committed deploy/redis/users.acl holds, its default signing key and S3 secret) all start with this."""
ALLOW_DEV_SECRETS = "HELOX_ALLOW_DEV_SECRETS"


def refuse_dev_secrets(settings: HeloxSettings, environ: Mapping[str, str] | None = None) -> None:
    """ConfigError when the settings hold a committed development secret and HELOX_ALLOW_DEV_SECRETS
    is not 1: a production deploy must not run on passwords and a key anyone can read."""
    environ = os.environ if environ is None else environ
    if environ.get(ALLOW_DEV_SECRETS, "").strip() == "1":
        return
    found = []
    password = urlsplit(settings.redis_url or "").password
    if password and unquote(password).startswith(DEV_SECRET_PREFIX):
        found.append("the Redis password in HELOX_REDIS_URL")
    if settings.signing_key and settings.signing_key.get_secret_value().startswith(DEV_SECRET_PREFIX):
        found.append("HELOX_SIGNING_KEY")
    s3_secret = getattr(settings, "s3_secret_access_key", None)
    if s3_secret and s3_secret.get_secret_value().startswith(DEV_SECRET_PREFIX):
        found.append("HELOX_S3_SECRET_ACCESS_KEY")  # deploy/compose.s3.yml's default
    if found:
        raise ConfigError(
            f"{' and '.join(found)} {'is' if len(found) == 1 else 'are'} a committed development default "
            f"({DEV_SECRET_PREFIX}...): set real secrets (deploy/redis/README.md), or {ALLOW_DEV_SECRETS}=1 "
            "on a development stack"
        )


def run_service(service: str, setup: Callable[[ServiceRuntime], None]) -> int:
    """Entry point of `python -m services.<name>`: exit 2 on bad config (or development secrets
    without HELOX_ALLOW_DEV_SECRETS=1), 0 on clean stop."""
    try:
        settings = load_settings()
        if not settings.redis_url:
            raise ConfigError("HELOX_REDIS_URL is not set: services need a Redis (`helox up` starts one for you)")
        refuse_dev_secrets(settings)
    except ConfigError as exc:
        print(f"{service}: {exc}", file=sys.stderr)
        return 2
    rt = ServiceRuntime(service, settings)
    configure_logging(service, rt.instance, fmt=settings.log_format, level=settings.log_level)
    keep_freed_memory()  # torch on CPU: reuse freed blocks instead of faulting in fresh pages
    setup(rt)
    asyncio.run(rt.run())
    return 0
