"""Structured logging (structlog): JSON or console, with service/instance/run_id/event_id bound.

Context travels in contextvars, so a handler that binds `run_id` and `event_id` tags every
line it logs, including lines from library code it calls.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(service: str, instance: str, *, fmt: str = "console", level: str = "info") -> None:
    """Configure structlog and the stdlib root logger once per process."""
    lvl = _LEVELS.get(level, logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=sys.stderr, force=True)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service, instance=instance)


FASTSTREAM_LOGGER = "faststream.access.redis"
"""The logger FastStream's Redis subscribers write to (its own stdout handler, no propagation)."""


class FetchErrorFilter(logging.Filter):
    """One line, not a traceback per subscriber, while Redis is away.

    Every FastStream subscriber (two per Bus subscription) logs "Message fetch error" with
    the full traceback on each retry, so a Redis restart fills a service's log with dozens of
    identical tracebacks. This filter drops the traceback, rewrites the record into one line
    naming the error, and lets one such line through per `interval_s` for each distinct
    error, counting the ones it held back. FastStream's NOGROUP message (the group vanished
    because Redis came back empty) loses its traceback too: the Bus watchdog recreates the
    group, so it is a one-line warning. Its task supervisor's "callback for Task-N is being
    executed..." (at every subscriber stop) is dropped.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        exc = record.exc_info[1] if record.exc_info else None
        if text == "Message fetch error":
            error = f"{type(exc).__name__}: {exc}" if exc is not None else "unknown error"
            now = time.monotonic()
            with self._lock:
                if now - self._last.get(error, -1e18) < self.interval_s:
                    self._held[error] = self._held.get(error, 0) + 1
                    return False
                self._last[error] = now
                held = self._held.pop(error, 0)
            more = f" ({held} similar held back)" if held else ""
            self._one_line(record, f"Redis read failed, retrying: {error}{more}", logging.WARNING)
        elif text.startswith("callback for ") and text.endswith(" is being executed..."):
            return False  # FastStream's task supervisor, at every subscriber stop: noise
        elif "no longer exists" in text and "Consumer group" in text:
            self._one_line(record, f"{text.split(' Stopping subscriber')[0]} The Helox bus recreates it.",
                           logging.WARNING)
        return True

    @staticmethod
    def _one_line(record: logging.LogRecord, message: str, level: int) -> None:
        record.msg, record.args = message, ()
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        record.levelno, record.levelname = level, logging.getLevelName(level)


def quiet_faststream_fetch_errors(interval_s: float = 1.0) -> FetchErrorFilter:
    """Install FetchErrorFilter on FastStream's Redis logger once per process."""
    logger = logging.getLogger(FASTSTREAM_LOGGER)
    for f in logger.filters:
        if isinstance(f, FetchErrorFilter):
            return f
    f = FetchErrorFilter(interval_s)
    logger.addFilter(f)
    return f


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)


bind = structlog.contextvars.bind_contextvars
bound = structlog.contextvars.bound_contextvars
