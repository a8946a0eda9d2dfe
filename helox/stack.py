"""The local stack: embedded Redis (when no HELOX_REDIS_URL) + the five service processes,
and optionally the reference Cyrex (`helox up --with-cyrex`).

`helox up` runs it in the foreground; `helox run` starts one for the run's duration when
none is running. A supervisor restarts a crashed service with exponential back-off.
A state file (`<state_dir>/stack.json`) lets other `helox` commands find a running stack.

Cyrex is an outside consumer: the stack starts it as a process (`python -m cyrex_example
serve`), never imports it. The embedded Redis has no ACL users, so it connects with the
stack's URL like the services do. Cyrex announces itself (`indexing`) before it has indexed
its collection (the standard library: ~20 s on two busy cores); `start()` returns only once
it heart-beats `ready`, so a run submitted after it is packed with Cyrex's chunks. It waits
up to `cyrex_ready_timeout_s` (`HELOX_CYREX_READY_TIMEOUT_S`, default 600) and fails with
CyrexNotReadyError, one line naming Cyrex, when Cyrex exits first or never gets ready.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from contracts import RetrieverHeartbeat, topic_for
from shared.bus.admin import decode_entry
from shared.config import HeloxSettings
from shared.logging import get_logger
from shared.redis_server import RedisServer
from shared.s3store import S3Location, is_s3_root

from .errors import CliError

log = get_logger("helox.stack")

SERVICES: dict[str, str] = {
    "data-prep": "services.data_prep",
    "trainer": "services.trainer",
    "health-monitor": "services.health_monitor",
    "evaluator": "services.evaluator",
    "exporter": "services.exporter",
}

CYREX = "cyrex"
CYREX_MODULE = "cyrex_example"
"""The reference Cyrex, supervised like a service with `--with-cyrex`."""

CYREX_READY_TIMEOUT_S = 600.0
CYREX_READY_ENV = "HELOX_CYREX_READY_TIMEOUT_S"
"""How long `--with-cyrex` waits for Cyrex's `ready` heartbeat (seconds; the env variable overrides)."""

MAX_BACKOFF_S = 30.0
HEALTHY_AFTER_S = 30.0  # a process that ran this long resets its back-off


class CyrexNotReadyError(CliError):
    """The supervised Cyrex exited, or did not heart-beat `ready` within the timeout."""


def cyrex_ready_timeout(value: float | None = None) -> float:
    """The Cyrex readiness timeout: `value`, else HELOX_CYREX_READY_TIMEOUT_S, else the default."""
    if value is None:
        raw = os.environ.get(CYREX_READY_ENV)
        if raw is None:
            return CYREX_READY_TIMEOUT_S
        try:
            value = float(raw)
        except ValueError:
            raise CliError(f"{CYREX_READY_ENV} must be a number of seconds, got {raw!r}") from None
    if not 0 < value <= 86_400:
        raise CliError(f"the Cyrex ready timeout ({CYREX_READY_ENV} / --cyrex-ready-timeout) must be between 0 "
                       f"and 86400 s, got {value}")
    return value


@dataclass
class Slot:
    """One supervised service instance."""

    service: str
    module: str
    instance: str
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    backoff_s: float = 1.0
    started_at: float = 0.0
    next_start: float = 0.0
    log_path: Path | None = None
    exits: list[int] = field(default_factory=list)
    args: tuple[str, ...] = ()
    """Command-line arguments after `python -m <module>`."""


class LocalStack:
    def __init__(
        self,
        settings: HeloxSettings,
        *,
        evaluators: int = 1,
        services: list[str] | None = None,
        config_path: Path | None = None,
        log_dir: Path | None = None,
        quiet: bool = True,
        cyrex_collection: Path | None = None,
        cyrex_ready_timeout_s: float | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        """`cyrex_collection`: also run the reference Cyrex, serving retrieval over that
        collection (a directory of .txt/.md/.py/.jsonl documents); `start()` waits up to
        `cyrex_ready_timeout_s` for it to be ready. `say`: where the lines for the user about
        that wait go (default: the CLI's console)."""
        self.settings = settings
        self.state_dir = Path(settings.state_dir).resolve()
        self.log_dir = (log_dir or self.state_dir / "logs").resolve()
        self.redis: RedisServer | None = None
        self.redis_url = settings.redis_url
        self.quiet = quiet
        self.config_path = Path(config_path).resolve() if config_path else None
        wanted = services or list(SERVICES)
        unknown = [s for s in wanted if s not in SERVICES]
        if unknown:
            raise ValueError(f"unknown service(s) {unknown}; known: {', '.join(SERVICES)}")
        self.slots: list[Slot] = []
        for service in wanted:
            count = evaluators if service == "evaluator" else 1
            for n in range(1, count + 1):
                # Stable instance names: a restarted process takes over its own pending entries.
                self.slots.append(Slot(service, SERVICES[service], f"{service}-{n}"))
        self.cyrex_ready_timeout_s = cyrex_ready_timeout(cyrex_ready_timeout_s) if cyrex_collection else 0.0
        self.cyrex_collection: Path | None = None
        self.cyrex_ready: RetrieverHeartbeat | None = None
        self._say = say
        if cyrex_collection is not None:
            collection = Path(cyrex_collection).resolve()
            self.cyrex_collection = collection
            if not collection.exists():
                raise ValueError(f"the Cyrex collection {collection} does not exist")
            instance = f"{CYREX}-1"
            self.slots.append(Slot(CYREX, CYREX_MODULE, instance, args=(
                "serve", "--collection", str(collection), "--instance", instance, "--from-start",
                "--allowed-root", str(Path(settings.artifacts).resolve()))))

    @property
    def state_file(self) -> Path:
        return self.state_dir / "stack.json"

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if not self.redis_url:
            self.redis = RedisServer(self.state_dir / "redis")
            self.redis.start()
            self.redis_url = self.redis.url
            log.info("embedded redis started", url=self.redis_url, binary=self.redis.executable)
        cyrex = self.cyrex_slot
        # Heartbeats after this id are the new Cyrex's (an outside Redis may hold an old `ready`).
        cursor = self._heartbeat_cursor() if cyrex is not None else "0-0"
        for slot in self.slots:
            self._spawn(slot)
        if cyrex is not None:
            try:
                self.cyrex_ready = self.wait_cyrex_ready(cyrex, cursor)
            except BaseException:  # not ready, or Ctrl-C while waiting: nothing is left running
                if cyrex.proc is not None and cyrex.proc.poll() is None:
                    cyrex.proc.kill()  # still indexing, serving nothing: SIGTERM would wait for the index
                self.stop()
                raise
        # Written once the stack is usable: `helox run` finds it only then.
        self.state_file.write_text(
            json.dumps({"redis_url": self.redis_url, "pid": os.getpid(), "instances": [s.instance for s in self.slots]})
        )

    @property
    def cyrex_slot(self) -> Slot | None:
        return next((s for s in self.slots if s.service == CYREX), None)

    def say(self, line: str) -> None:
        if self._say is not None:
            self._say(line)
            return
        from .common import console  # late: helox.common imports this module

        console.print(line, highlight=False, markup=False, soft_wrap=True)

    def _client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url or "", socket_timeout=10.0, socket_connect_timeout=5.0)

    def _heartbeat_stream(self) -> str:
        return topic_for(RetrieverHeartbeat).stream(self.settings.topic_prefix)

    def _heartbeat_cursor(self) -> str:
        with self._client() as client:
            last = client.xrevrange(self._heartbeat_stream(), count=1)
        if not last:
            return "0-0"
        return last[0][0].decode() if isinstance(last[0][0], bytes) else str(last[0][0])

    def wait_cyrex_ready(self, slot: Slot, cursor: str = "0-0") -> RetrieverHeartbeat:
        """Block until the Cyrex of `slot` heart-beats `ready` (after `cursor` on retrieval.heartbeat);
        CyrexNotReadyError, naming Cyrex, when it exits first or the timeout passes."""
        timeout = self.cyrex_ready_timeout_s
        stream = self._heartbeat_stream()
        started = time.monotonic()
        self.say(f"waiting for Cyrex ({slot.instance}) to index {self.cyrex_collection} "
                 f"(up to {timeout:.0f} s)…")
        last: RetrieverHeartbeat | None = None
        with self._client() as client:
            while True:
                code = slot.proc.poll() if slot.proc is not None else None
                if code is not None:
                    raise CyrexNotReadyError(
                        f"Cyrex ({slot.instance}) exited with code {code} before it was ready: "
                        f"{_last_line(slot.log_path)} (log: {slot.log_path})")
                left = started + timeout - time.monotonic()
                if left <= 0:
                    status = f"last heartbeat: {last.status}" if last else "no heartbeat from it"
                    raise CyrexNotReadyError(
                        f"Cyrex ({slot.instance}) was not ready within {timeout:g} s ({status}; still indexing "
                        f"{self.cyrex_collection}?): raise {CYREX_READY_ENV} (helox up: --cyrex-ready-timeout), "
                        f"index a smaller --cyrex-collection, or see {slot.log_path}")
                got = client.xread({stream: cursor}, count=100, block=max(1, int(min(left, 0.5) * 1000)))
                for _, entries in got or []:
                    for entry_id, fields in entries:
                        cursor = entry_id
                        env = decode_entry(fields)
                        hb = env.payload if env is not None else None
                        if not isinstance(hb, RetrieverHeartbeat) or hb.instance != slot.instance:
                            continue
                        last = hb
                        if hb.status == "ready":
                            self.say(f"Cyrex ({slot.instance}) ready: {hb.index_chunks} chunks of "
                                     f"{hb.index_documents} documents, index {hb.index_digest[:12]}… "
                                     f"({time.monotonic() - started:.1f} s)")
                            return hb

    def env(self, instance: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HELOX_REDIS_URL=self.redis_url or "",
            HELOX_INSTANCE=instance,
            # s3://bucket/prefix as it is (a Path shows it as s3:/...; resolving it would make it a local path).
            HELOX_ARTIFACTS=(S3Location.parse(self.settings.artifacts).uri if is_s3_root(self.settings.artifacts)
                             else str(Path(self.settings.artifacts).resolve())),
            HELOX_STATE_DIR=str(self.state_dir),
            HELOX_TOPIC_PREFIX=self.settings.topic_prefix,
            PYTHONUNBUFFERED="1",
        )
        if self.config_path:
            env["HELOX_CONFIG"] = str(self.config_path)
        if self.settings.signing_key is None:
            env["HELOX_SIGNING_KEY"] = local_signing_key(self.state_dir)
        return env

    def _spawn(self, slot: Slot) -> None:
        slot.log_path = self.log_dir / f"{slot.instance}.log"
        out = open(slot.log_path, "ab")  # noqa: SIM115  (the child owns it)
        slot.proc = subprocess.Popen(
            [sys.executable, "-m", slot.module, *slot.args],
            env=self.env(slot.instance),
            stdout=out if self.quiet else None,
            stderr=subprocess.STDOUT if self.quiet else None,
            start_new_session=True,  # Ctrl-C reaches us; we stop children in order
        )
        out.close()
        slot.started_at = time.monotonic()

    def supervise_once(self) -> list[str]:
        """Restart crashed processes with back-off; returns what happened."""
        events = []
        now = time.monotonic()
        for slot in self.slots:
            if slot.proc is None:
                if now >= slot.next_start:
                    self._spawn(slot)
                    slot.restarts += 1
                    events.append(f"{slot.instance} restarted (#{slot.restarts})")
                continue
            code = slot.proc.poll()
            if code is None:
                if now - slot.started_at > HEALTHY_AFTER_S:
                    slot.backoff_s = 1.0
                continue
            slot.exits.append(code)
            slot.proc = None
            slot.next_start = now + slot.backoff_s
            events.append(f"{slot.instance} exited with {code}; restarting in {slot.backoff_s:.0f}s (log: {slot.log_path})")
            slot.backoff_s = min(slot.backoff_s * 2, MAX_BACKOFF_S)
        return events

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every service (they finish or release their work), then stop Redis."""
        for slot in self.slots:
            if slot.proc and slot.proc.poll() is None:
                slot.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for slot in self.slots:
            if slot.proc is None:
                continue
            try:
                slot.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("service did not stop in time; killing", instance=slot.instance)
                slot.proc.kill()
                slot.proc.wait()
            slot.proc = None
        if self.redis:
            self.redis.stop()
            self.redis = None
        self.state_file.unlink(missing_ok=True)


def _last_line(path: Path | None) -> str:
    """The last non-empty line of a log (its `event`/`error` when it is a JSON log line), short."""
    try:
        lines = [x for x in (path.read_text("utf-8", errors="replace") if path else "").splitlines() if x.strip()]
    except OSError:
        return "no log"
    if not lines:
        return "no output"
    line = lines[-1].strip()
    try:
        rec = json.loads(line)
        if isinstance(rec, dict):
            line = " ".join(str(rec[k]) for k in ("event", "error") if k in rec) or line
    except ValueError:
        pass
    return line[:300]


def default_cyrex_collection() -> Path:
    """What Cyrex indexes when `--cyrex-collection` is not given: the Python standard library,
    the corpus of the demo run (configs/demo.yaml)."""
    return Path(sysconfig.get_paths()["stdlib"])


def local_signing_key(state_dir: str | os.PathLike[str]) -> str:
    """A development signing key kept in the state directory (created once, mode 0600), used
    when HELOX_SIGNING_KEY is not set so that a local stack still signs its exports."""
    path = Path(state_dir).resolve() / "signing.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip()


def find_running_stack(settings: HeloxSettings) -> str | None:
    """The Redis URL of a stack started by `helox up` that is still alive, if any."""
    state = Path(settings.state_dir).resolve() / "stack.json"
    if not state.exists():
        return None
    try:
        data = json.loads(state.read_text())
        os.kill(int(data["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return str(data["redis_url"])
