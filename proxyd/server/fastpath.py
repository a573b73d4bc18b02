"""Pre-rendered answers to the hottest requests: a manifest by digest, or a fresh
tag, that the core has just served from memory.

A node pulling an image, and a fleet of them starting the same pod, ask for the same
tags and manifests again and again. Through aiohttp's full request cycle (request
object, middlewares, router, response object) such a hit costs several times what
answering it does. So after the handler has served a hit, its answer is remembered
here, rendered to bytes under the request target it answered (and, for a tag, the
Accept lines it was asked with: they choose the answer), and the connection's
protocol (`FastRequestHandler`) writes it straight back when the same request comes
again, for as long as the core says the hit stands (`ManifestMemory.is_current`, until
the earlier of the manifest's and the tag's deadlines).

It only ever answers the simplest case and hands everything else to aiohttp
untouched: one plainly well-formed `GET` or `HEAD` head in the data received, with
only headers known to change nothing about the answer (proxyd/server/simplehead.py
reads it, strictly: when in doubt, aiohttp decides), on a connection that is idle
(aiohttp waiting for its next request, every earlier answer written, nothing
half-parsed). Access log, metrics and response headers are the same as the
handler's. The connections of `ProxydRunner` also answer the requests aiohttp
refuses before routing (proxyd/server/rejections.py) and keep to the connection
bounds (proxyd/server/limits.py), with or without remembered answers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler

from proxyd.manifests import Manifest
from proxyd.memory import ManifestMemory
from proxyd.metrics import Metrics, Observations
from proxyd.server import limits
from proxyd.server.keys import METRICS, RUNTIME, Access
from proxyd.server.limits import LimitedRequestHandler, LimitedServer, Limits
from proxyd.server.middleware import AccessLine, AccessLogger, counting_into, new_request_id
from proxyd.server.simplehead import accept_key, simple_head

log = structlog.get_logger("proxyd.server")
MAX_ANSWERS = 4096
_SERVER = f"Server: {SERVER_SOFTWARE}\r\n".encode()


class _Tally:
    """The hits of one route, method and kind (manifest by digest, or tag), counted
    aside (prometheus-client takes a lock per increment) and settled into the metrics
    before each scrape."""

    __slots__ = ("count", "durations", "kind", "method", "route", "sent")

    def __init__(self, route: str, method: str, kind: str, metrics: Metrics) -> None:
        self.route, self.method, self.kind = route, method, kind
        self.count = self.sent = 0
        self.durations = Observations(metrics.request_seconds.labels(route))

    def settle(self, metrics: Metrics) -> None:
        if self.count:
            metrics.requests.labels(self.route, self.method, "200").inc(self.count)
            metrics.cache.labels(self.kind, "hit").inc(self.count)
            metrics.bytes_served.labels("store").inc(self.sent)
            self.count = self.sent = 0
        self.durations.settle()


@dataclass(frozen=True, slots=True)
class _Answer:
    head_lines: bytes  # status line and the headers that never change
    body: bytes
    get_line: AccessLine  # the access line of a GET
    head_line: AccessLine  # of a HEAD
    get_tally: _Tally  # where a GET is counted
    head_tally: _Tally  # a HEAD
    generation: int
    fresh_until: float


class FastAnswers:
    """The answers remembered by request target, and the code that matches a request
    against them. One per app; `enabled` is off where every pull must authenticate."""

    def __init__(self, metrics: Metrics, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.answered = 0  # requests answered here, for tests and curiosity
        self.manifest_memory: ManifestMemory | None = None  # set once the core is open
        self._answers: dict[bytes, _Answer] = {}  # manifests by digest, by target
        self._tag_answers: dict[bytes, dict[bytes, _Answer]] = {}  # by target, Accept
        self._count = 0  # answers remembered
        self._bytes = 0  # of bodies remembered, within the core's manifest_memory
        self._metrics = metrics
        self._tallies: dict[tuple[str, str, str], _Tally] = {}  # by route, method, kind
        metrics.before_render(self.settle)
        self._date = b""
        self._date_second = -1

    def remember(
        self,
        raw_target: str,
        path: str,
        manifest: Manifest,
        headers: dict[str, str],
        access: Access,
        accept: list[str] | None = None,
    ) -> None:
        """After the handler served `manifest` as a hit for `raw_target` (the request
        line's target as sent; `path` is its decoded path, as the access log has it).
        `accept`: for a tag, the Accept lines it was asked with."""
        memory = self.manifest_memory
        if not self.enabled or memory is None or manifest.fresh_until is None:
            return
        target = raw_target.encode("utf-8", "surrogateescape")
        accepted = None
        if accept is not None:
            accepted = accept_key(a.encode("utf-8", "surrogateescape") for a in accept)
        self._drop(target, accepted)
        size = len(manifest.body)
        if size > memory.max_bytes:
            return  # not kept in memory by the core either (manifest_memory = 0: none)
        if self._count >= MAX_ANSWERS or self._bytes + size > memory.max_bytes:
            self._answers.clear()  # they are rendered again from the next hits
            self._tag_answers.clear()
            self._count = self._bytes = 0
        lines = [b"HTTP/1.1 200 OK\r\n"]
        for name, value in headers.items():
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        lines.append(f"Content-Length: {manifest.size}\r\n".encode())
        lines.append(_SERVER)
        kind = "manifest" if accepted is None else "tag"
        answer = _Answer(
            b"".join(lines),
            manifest.body,
            AccessLine("GET", path, access, 200, size),
            AccessLine("HEAD", path, access, 200, 0),
            self._tally(access.route, "GET", kind),
            self._tally(access.route, "HEAD", kind),
            memory.generation,
            manifest.fresh_until,
        )
        if accepted is None:
            self._answers[target] = answer
        else:
            self._tag_answers.setdefault(target, {})[accepted] = answer
        self._count += 1
        self._bytes += size

    def _tally(self, route: str, method: str, kind: str) -> _Tally:
        key = (route, method, kind)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = _Tally(route, method, kind, self._metrics)
        return tally

    def _drop(self, target: bytes, accepted: bytes | None) -> None:
        """Forget the answer to `target` (asked with `accepted`, for a tag), if any."""
        if accepted is None:
            answer = self._answers.pop(target, None)
        else:
            tags = self._tag_answers.get(target)
            answer = tags.pop(accepted, None) if tags is not None else None
            if tags is not None and not tags:
                del self._tag_answers[target]
        if answer is not None:
            self._count -= 1
            self._bytes -= len(answer.body)

    def answer(self, data: bytes) -> bytes | None:
        """The whole response to `data`, or None to let aiohttp handle it."""
        start = time.perf_counter()
        request = simple_head(data)
        if request is None:
            return None
        method, target = request.method, request.target
        remembered = self._answers.get(target)
        tags = self._tag_answers.get(target) if remembered is None else None
        if (remembered is None and tags is None) or self.manifest_memory is None:
            return None
        accepted = None
        if tags is not None:
            accepted = request.accept
            remembered = tags.get(accepted)
            if remembered is None:
                return None
        assert remembered is not None
        if not self.manifest_memory.is_current(remembered.generation, remembered.fresh_until):
            self._drop(target, accepted)
            return None
        request_id = request.request_id or new_request_id()
        head = method == b"HEAD"
        self.answered += 1
        response = b"".join(
            (
                remembered.head_lines,
                b"X-Request-Id: ",
                request_id.encode(),
                b"\r\nDate: ",
                self._http_date(),
                b"\r\n\r\n",
                b"" if head else remembered.body,
            )
        )
        tally = remembered.head_tally if head else remembered.get_tally
        tally.count += 1
        tally.sent += 0 if head else len(remembered.body)
        seconds = time.perf_counter() - start
        tally.durations.observe(seconds)
        access_line = remembered.head_line if head else remembered.get_line
        access_line.write(seconds, request_id)
        return response

    def settle(self) -> None:
        for tally in self._tallies.values():
            tally.settle(self._metrics)

    def _http_date(self) -> bytes:
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()
        return self._date


class FastRequestHandler(LimitedRequestHandler):
    """aiohttp's connection protocol, answering remembered hits itself when the
    connection is idle and the request is one it may answer."""

    def __init__(self, manager: LimitedServer, fast: FastAnswers, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._fast = fast
        self._at_boundary = True  # the parser holds no part of a request

    def data_received(self, data: bytes) -> None:
        if (
            self._at_boundary
            and self._fast.enabled
            and self._idle()
            and self._payload_parser is None
            and not self._upgraded
            and not self._close
            and not self._force_close
            and not self._paused
            and self.transport is not None
        ):
            response = self._fast.answer(data)
            if response is not None:
                self.transport.write(response)
                if self._keepalive_timeout:
                    self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
                return
        queued = len(self._messages)
        super().data_received(data)
        # Only a head ending the data, of a message without a body, leaves the parser
        # empty; anything else keeps this connection on aiohttp's path until then.
        self._at_boundary = (
            data.endswith(b"\r\n\r\n")
            and len(self._messages) > queued
            and self._messages[-1][1] is EMPTY_PAYLOAD
            and self._payload_parser is None
            and not self._upgraded
        )

    def _idle(self) -> bool:
        """Whether aiohttp is waiting for the next request, every earlier answer
        written. An empty queue is not enough: aiohttp takes a request off it and
        starts handling it a loop turn later (the handler runs as a task of its own),
        and an answer written in between would overtake that request's."""
        waiter = self._waiter
        return waiter is not None and not waiter.done()


class FastServer(LimitedServer):
    """aiohttp's Server, making connections that know the remembered answers."""

    def __init__(self, handler: Any, *, fast: FastAnswers, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._fast = fast

    def __call__(self) -> RequestHandler:
        return FastRequestHandler(self, self._fast, loop=self._loop, **self._kwargs)


# aiohttp internals the connection protocol relies on: checked before it is used, so
# an aiohttp that differs runs without remembered answers instead of failing.
NEEDED_PROTOCOL_STATE = (
    "_messages",
    "_waiter",
    "_payload_parser",
    "_upgraded",
    "_close",
    "_force_close",
    "_paused",
    "_keepalive_timeout",
    "_next_keepalive_close_time",
    "_loop",
)


def aiohttp_fits() -> bool:
    slots: set[str] = set()
    for cls in RequestHandler.__mro__:
        slots.update(getattr(cls, "__slots__", ()))
    return all(name in slots for name in NEEDED_PROTOCOL_STATE)


class ProxydRunner(web.AppRunner):
    """aiohttp's AppRunner for proxyd's app: its connections answer remembered hits
    and the requests aiohttp refuses (proxyd/server/rejections.py), keep to the
    connection bounds of the app's settings (proxyd/server/limits.py), and its access
    log counts every request in the app's metrics."""

    def __init__(
        self,
        app: web.Application,
        *,
        access_log_class: type[AbstractAccessLogger] = AccessLogger,
        **kwargs: Any,
    ) -> None:
        if access_log_class is AccessLogger:
            access_log_class = counting_into(app[METRICS])
        settings = app[RUNTIME].settings
        kwargs.setdefault("keepalive_timeout", settings.keepalive_timeout)  # aiohttp's: 1 h
        self._limits = Limits.of(settings)
        super().__init__(app, access_log_class=access_log_class, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        fast, metrics = self.app[FAST], self.app[METRICS]
        adoptable = hasattr(server, "_kwargs") and hasattr(server, "_loop")
        if not (adoptable and aiohttp_fits() and limits.aiohttp_fits()):
            if fast.enabled:
                log.warning("fastpath.off", reason="this aiohttp's connection protocol differs")
            fast.enabled = False
            if not adoptable:
                return server
            return limits.adopt(server, self._limits, metrics)
        return FastServer.adopting(server, fast=fast, limits=self._limits, metrics=metrics)


FAST = web.AppKey("fast", FastAnswers)
