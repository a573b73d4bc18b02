"""Bounds on what one client connection may hold: how long its request head may take
to arrive (`header_timeout`), how long it may idle between requests
(`keepalive_timeout`, aiohttp's own timer, which proxyd sets instead of aiohttp's
hour), and how many connections are served at once (`max_connections`).

Without them, a client sending its request head a byte at a time, or a thousand kept
alive and idle, hold a descriptor each for as long as they like. The header timeout
runs from a head's first byte to its end (Go's ReadHeaderTimeout); a connection that
misses it is closed, unanswered: there is no request to answer yet.

A connection past the cap is refused, not queued: answered at once with a 503
`UNAVAILABLE` (Retry-After: 1) and closed, so it holds a descriptor for a moment only
(at most `REFUSAL_LINGER`, for the client to read the answer). A client told so
retries, and containerd, whose hosts.toml names proxyd as a mirror, moves on to the
next host rather than wait behind a full proxyd. Queueing would mean leaving
connections in the kernel's accept queue, which asyncio offers no public way to stop
taking from, or holding accepted ones, which spends the descriptors the cap is there
to save. TLS handshakes come before a connection is counted; asyncio bounds them (60 s).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxyd.config import Settings
from proxyd.errors import Overloaded
from proxyd.metrics import Metrics
from proxyd.server.middleware import API_VERSION_HEADER
from proxyd.server.rejections import RejectingRequestHandler, RejectingServer

log = structlog.get_logger("proxyd.server")

REFUSAL_LINGER = 1.0  # seconds a refused connection stays open for its answer to be read
REFUSAL_LOG_EVERY = 60.0  # seconds between warnings while connections are refused

# aiohttp internals the bounds read: checked before they are used, so an aiohttp that
# differs runs with the keep-alive timer alone instead of failing every connection.
NEEDED_PROTOCOL_STATE = (
    "_request_count",
    "_messages",
    "_request_in_progress",
    "_force_close",
    "_loop",
)


@dataclass(frozen=True)
class Limits:
    header_timeout: float
    max_connections: int

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(settings.header_timeout, settings.max_connections)


def aiohttp_fits() -> bool:
    slots: set[str] = set()
    for cls in RequestHandler.__mro__:
        slots.update(getattr(cls, "__slots__", ()))
    return all(name in slots for name in NEEDED_PROTOCOL_STATE)


def _refusal(max_connections: int) -> bytes:
    """The whole answer to a connection past the cap, rendered once."""
    error = Overloaded(f"proxyd serves {max_connections} connections at once; try again")
    body = json.dumps(error.body(), separators=(",", ":")).encode()
    lines = [
        f"HTTP/1.1 {error.status} Service Unavailable",
        "Content-Type: application/json; charset=utf-8",
        *(f"{name}: {value}" for name, value in API_VERSION_HEADER.items()),
        "Retry-After: 1",
        "Connection: close",
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class LimitedRequestHandler(RejectingRequestHandler):
    """aiohttp's connection protocol with the header timeout, refusing itself when it
    would pass the server's cap."""

    def __init__(self, manager: LimitedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limited = manager
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started_at = 0  # the request count when the unfinished head began
        self._refused: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._limited.full():
            self._refuse(transport)  # type: ignore[arg-type]
            return
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            return  # whatever the refused client sends, read and dropped
        count = self._request_count
        super().data_received(data)
        if self._limited.limits.header_timeout > 0:
            self._watch_head(count)

    def eof_received(self) -> None:
        if self._refused is not None:
            self._refused.close()  # the client read its answer and is done
            return
        super().eof_received()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_timer()
        if self._refused is not None:
            self._refused = None
            return  # never counted, never started: nothing of aiohttp's to end
        super().connection_lost(exc)

    # -- the header timeout ---------------------------------------------------------------

    def _watch_head(self, count_before: int) -> None:
        """After data arrived: a head that ended stops the timer; the first bytes of
        one, with no request in hand, start it."""
        if self._request_count != count_before:
            self._stop_head_timer()
        elif (
            self._head_timer is None
            and not self._messages
            and not self._request_in_progress
            and not self._force_close
        ):
            self._head_started_at = count_before
            self._head_timer = self._loop.call_later(
                self._limited.limits.header_timeout, self._head_timed_out
            )

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if (
            self._request_count == self._head_started_at
            and not self._messages
            and not self._request_in_progress
        ):
            self._limited.dropped("header_timeout")
            log.debug("connection.header_timeout", timeout=self._limited.limits.header_timeout)
            self.force_close()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    # -- the cap --------------------------------------------------------------------------

    def _refuse(self, transport: asyncio.Transport) -> None:
        """Answer 503 before reading anything, and close: at once once the client has
        read it (its end of the stream), else after REFUSAL_LINGER."""
        self._refused = transport
        self._limited.dropped("max_connections")
        transport.write(self._limited.refusal)
        if transport.can_write_eof():
            transport.write_eof()  # our side is done; the client's close ends it
        self._loop.call_later(REFUSAL_LINGER, transport.close)


class LimitedServer(RejectingServer):
    """aiohttp's Server, making connections with the bounds above."""

    def __init__(self, handler: Any, *, limits: Limits, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.limits = limits
        self.refusal = _refusal(limits.max_connections)
        self._metrics = metrics
        self._refused = 0  # since the last warning
        self._warned_at: float | None = None

    def __call__(self) -> RequestHandler:
        return LimitedRequestHandler(self, loop=self._loop, **self._kwargs)

    def full(self) -> bool:
        return len(self._connections) >= self.limits.max_connections

    def dropped(self, reason: str) -> None:
        self._metrics.connections_dropped.labels(reason).inc()
        if reason != "max_connections":
            return
        self._refused += 1
        now = self._loop.time()
        if self._warned_at is None or now - self._warned_at >= REFUSAL_LOG_EVERY:
            log.warning(
                "connections.refused",
                max_connections=self.limits.max_connections,
                refused=self._refused,
            )
            self._warned_at, self._refused = now, 0


def adopt(server: web.Server, limits: Limits, metrics: Metrics) -> web.Server:
    """The server aiohttp's runner built, with the bounds above, where this aiohttp's
    connection protocol is the one they were written for."""
    if not aiohttp_fits():
        log.warning("limits.off", reason="this aiohttp's connection protocol differs")
        return RejectingServer.adopting(server)
    return LimitedServer.adopting(server, limits=limits, metrics=metrics)


class LimitedRunner(web.AppRunner):
    """aiohttp's AppRunner whose connections keep to the bounds above: for a listener
    beside the main one (the fleet's peer listener), which must not be an unbounded
    way in where the main listener is bounded."""

    def __init__(
        self, app: web.Application, *, limits: Limits, metrics: Metrics, **kwargs: Any
    ) -> None:
        self._limits, self._metrics = limits, metrics
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        if not (hasattr(server, "_kwargs") and hasattr(server, "_loop")):
            return server
        return adopt(server, self._limits, self._metrics)
