"""structlog set-up: JSON lines for machines, colour for people on a terminal.

proxyd's own events take structlog's direct path (a filtering bound logger) and are
rendered with orjson: a fraction of the cost of the `logging` module, which matters
for an access-log line per request. Other libraries' `logging` records (aiohttp,
asyncio) go through the same processors into the same output.

While a server runs (`OUTPUT.batched()`), access lines are written in batches,
flushed every 50 ms, by the next other event, and on the way out: one write per
batch instead of one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
import structlog

FLUSH_EVERY = 0.05  # seconds an access line may wait in a batch
ACCESS_LOGGER = "proxyd.access"


class Output:
    """stderr, line by line, or in batches while a server runs."""

    def __init__(self) -> None:
        # JSON lines at info level: hot paths may render access events themselves.
        self.json_access = False
        self._batch: TextIO | None = None
        self._lock = threading.Lock()  # executor threads log too

    def write(self, text: str, *, urgent: bool = True) -> None:
        with self._lock:
            batch = self._batch
            if batch is None:
                sys.stderr.write(text)
                sys.stderr.flush()
                return
            batch.write(text)
            if urgent:
                batch.flush()

    def flush(self) -> None:
        with self._lock:
            (self._batch or sys.stderr).flush()

    @contextlib.asynccontextmanager
    async def batched(self, interval: float = FLUSH_EVERY) -> AsyncIterator[None]:
        sys.stderr.flush()
        batch = open(  # noqa: ASYNC230, SIM115 (fd 2, kept open; no disk I/O)
            sys.stderr.fileno(), "w", buffering=1 << 16, encoding="utf-8", closefd=False
        )
        with self._lock:
            self._batch = batch
        task = asyncio.create_task(self._flush_every(interval))
        try:
            yield
        finally:
            task.cancel()
            with self._lock:
                self._batch = None
                batch.close()  # flushes

    async def _flush_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.flush()


OUTPUT = Output()


def access_direct(fields: dict[str, Any]) -> bool:
    """Write an access event from a hot path without structlog's machinery, exactly
    as its JSON pipeline would (which adds level, logger and timestamp to what has no
    context to merge); False where the output is not JSON lines at info level."""
    if not OUTPUT.json_access:
        return False
    fields["level"] = "info"
    fields["logger"] = ACCESS_LOGGER
    fields["timestamp"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    OUTPUT.write(_dumps(fields) + "\n", urgent=False)
    return True


class Logger:
    """What structlog's bound loggers write through, a line per event. Only access
    lines (`proxyd.access`, one per request) wait for their batch; every other event,
    starting and stopping included, is written at once."""

    def __init__(self, name: str, output: Output = OUTPUT) -> None:
        self.name = name  # for structlog.stdlib.add_logger_name
        self._output = output
        self._urgent = name != ACCESS_LOGGER

    def msg(self, message: str) -> None:
        self._output.write(message + "\n", urgent=self._urgent)

    def _now(self, message: str) -> None:
        self._output.write(message + "\n")

    debug = info = msg
    warning = warn = error = err = critical = exception = fatal = failure = _now


class _Stream:
    """The `logging` handler's stream: the same output as proxyd's own events."""

    def write(self, text: str) -> None:
        OUTPUT.write(text)

    def flush(self) -> None:
        pass  # the handler flushes after every record; the batch decides


def _logger_factory(*args: Any) -> Logger:
    return Logger(str(args[0]) if args else "proxyd")


def _dumps(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=repr).decode()


def configure(level: str = "info", fmt: str = "auto") -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    exc_info = [structlog.processors.format_exc_info] if fmt == "json" else []
    numeric_level = logging.getLevelName(level.upper())
    OUTPUT.json_access = fmt == "json" and numeric_level <= logging.INFO
    structlog.configure(
        processors=[*shared, *exc_info, renderer],
        logger_factory=_logger_factory,
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(_Stream())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
