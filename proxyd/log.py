"""structlog set-up: JSON lines for machines, colour for people on a terminal.

proxyd's own events take structlog's direct path (a filtering bound logger writing
to stderr): about a third of the cost of going through the `logging` module, which
matters for an access-log line per request. Other libraries' `logging` records
(aiohttp, asyncio) are rendered by the same processors into the same stream.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog


class NamedWriteLogger(structlog.WriteLogger):
    """A WriteLogger that knows its name, so `add_logger_name` can record it."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


def _logger_factory(*args: Any) -> NamedWriteLogger:
    return NamedWriteLogger(sys.stderr, str(args[0]) if args else "proxyd")


def configure(level: str = "info", fmt: str = "auto") -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer()
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
    structlog.configure(
        processors=[*shared, *exc_info, renderer],
        logger_factory=_logger_factory,
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
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
