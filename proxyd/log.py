"""structlog set-up: JSON lines for machines, colour for people on a terminal.

proxyd's own events take structlog's direct path (a filtering bound logger) and are
rendered with orjson: a fraction of the cost of the `logging` module, which matters
for an access-log line per request. Other libraries' `logging` records (aiohttp,
asyncio) go through the same processors into the same output.

While a server runs (`OUTPUT.batched()`), access lines are written in batches,
flushed every 50 ms, by the next other event, at 128 lines, and on the way out: one
write per batch instead of one per request. The hottest path (remembered answers)
renders its access line once, as an `AccessTemplate`, and fills in only what changes
per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import structlog

FLUSH_EVERY = 0.05  # seconds an access line may wait in a batch
MAX_BATCH = 128  # lines (~50 KiB): a batch is written when it has this many
WRITE_WAIT = 1.0  # seconds a write waits for a non-blocking stderr's reader (at most)
ACCESS_LOGGER = "proxyd.access"


class Output:
    """stderr, line by line, or in batches while a server runs."""

    def __init__(self, fd: int = 2) -> None:
        # JSON lines at info level: hot paths may render access events themselves.
        self.json_access = False
        self._fd = fd
        self._batch: list[str] | None = None  # lines not yet written, while batched
        self._lock = threading.Lock()  # executor threads log too
        self.write_wait = WRITE_WAIT
        self._stalled = False  # a wait for a non-blocking stderr was in vain
        self._cut = False  # the last write ended inside a line

    def write(self, text: str, *, urgent: bool = True) -> None:
        with self._lock:
            batch = self._batch
            if batch is None:
                sys.stderr.write(text)
                sys.stderr.flush()
                return
            batch.append(text)
            if urgent or len(batch) >= MAX_BATCH:
                self._write_batch(batch)

    def flush(self) -> None:
        with self._lock:
            if self._batch is None:
                sys.stderr.flush()
            elif self._batch:
                self._write_batch(self._batch)

    def _write_batch(self, batch: list[str]) -> None:
        """One write of the whole batch (the lock is held). A log that cannot be
        written (stderr closed, its reader gone) is dropped: it must not fail the
        request that logged. A line cut short by a drop is ended before the next
        batch, so no line is glued to another."""
        data = "".join(batch).encode("utf-8", "backslashreplace")
        batch.clear()
        if self._cut:
            data = b"\n" + data
        written = self._write_all(data)
        if written:
            self._cut = data[written - 1] != 0x0A  # "\n"

    def _write_all(self, data: bytes) -> int:
        """The bytes of `data` written. A stderr its parent left non-blocking (EAGAIN
        while its reader is behind) is waited for up to `write_wait` seconds at a time,
        as a blocking one would be, but bounded: after a wait in vain, nothing more is
        waited for until a batch goes out whole."""
        view, written = memoryview(data), 0
        while written < len(data):
            try:
                written += os.write(self._fd, view[written:])
            except BlockingIOError:
                if self._stalled or not _writable(self._fd, self.write_wait):
                    self._stalled = True
                    return written
            except OSError:
                return written
        self._stalled = False
        return written

    @contextlib.asynccontextmanager
    async def batched(self, interval: float = FLUSH_EVERY) -> AsyncIterator[None]:
        sys.stderr.flush()
        with self._lock:
            self._batch = []
        task = asyncio.create_task(self._flush_every(interval))
        try:
            yield
        finally:
            task.cancel()
            with self._lock:
                if self._batch:
                    self._write_batch(self._batch)
                self._batch = None

    async def _flush_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.flush()


def _writable(fd: int, timeout: float) -> bool:
    """Whether `fd` takes more within `timeout` seconds (poll: any descriptor number)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(timeout * 1000))


OUTPUT = Output()


HOLE = "\x00"  # a field value that an AccessTemplate fills in per line


class AccessTemplate:
    """An access event rendered once as the JSON pipeline renders it (which adds level,
    logger and timestamp to an event without context), but for the fields given as
    `HOLE`: each line then costs one join of strings instead of a dict, a render and
    a timestamp object. Writes only where the output is JSON lines at info level."""

    def __init__(self, fields: dict[str, Any]) -> None:
        line = {**fields, "level": "info", "logger": ACCESS_LOGGER, "timestamp": HOLE}
        pieces = _dumps(line).split(_dumps(HOLE))
        # A line is these pieces with the texts of the holes between them: the
        # fields', then the timestamp's date and time and its fraction.
        *fixed, last = pieces
        self._line: list[str] = []
        for piece in fixed[:-1]:
            self._line += (piece, "")
        self._line += (f'{fixed[-1]}"', "", "", "", f'Z"{last}\n')
        # A fixed value that is HOLE itself would shift the holes: such a template
        # never writes (its users log through structlog instead).
        holes = sum(value is HOLE for value in fields.values())
        self._holes = holes if len(pieces) == holes + 2 else -1

    def write(self, *values: Any) -> bool:
        """Fill the holes with `values`, in the fields' order, and the timestamp with
        now; False (nothing written) where the output is not JSON lines at info."""
        return self.write_json(*map(_dumps, values))

    def write_json(self, *texts: str) -> bool:
        """`write`, each value given as its JSON text: a caller that knows its values'
        types renders them for less than orjson's general path."""
        if not OUTPUT.json_access or len(texts) != self._holes:
            return False
        line = self._line.copy()
        line[1::2] = (*texts, *_now())
        OUTPUT.write("".join(line), urgent=False)
        return True


class _Second:
    """The date and time of the last second a timestamp was made for."""

    number = -1
    text = ""


def _now() -> tuple[str, str]:
    """Now as structlog's `TimeStamper(fmt="iso", utc=True)` writes it, but for the
    closing `Z`: the date and time to the second (formatted once a second), and the
    fraction (none on a whole second)."""
    second, micro = divmod(time.time_ns() // 1000, 1_000_000)
    if second != _Second.number:
        _Second.text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _Second.number = second
    return _Second.text, f".{micro:06d}" if micro else ""


def utc_timestamp() -> str:
    """Now, exactly as structlog's `TimeStamper(fmt="iso", utc=True)` writes it
    (`2026-11-27T10:07:10.233058Z`, no fraction on a whole second)."""
    second, fraction = _now()
    return f"{second}{fraction}Z"


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


json_text = _dumps  # a value's JSON, as the log renders it


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
