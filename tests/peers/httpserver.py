"""Run an aiohttp application on 127.0.0.1 in a background thread.

The thread owns its event loop, so the server keeps answering while a synchronous
test blocks on a subprocess (skopeo, ctr, podman) that talks to it.  Requests are
recorded as they arrive so tests can assert on exactly what a peer sent.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Self

from aiohttp import web

from tests.peers import LOOPBACK, Listening, PeerError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server received it."""

    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    headers: tuple[tuple[str, str], ...]
    form: tuple[tuple[str, str], ...] = ()

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)

    def header_values(self, name: str) -> list[str]:
        lowered = name.lower()
        return [v for k, v in self.headers if k.lower() == lowered]

    def query_values(self, name: str) -> list[str]:
        return [v for k, v in self.query if k == name]

    def form_value(self, name: str) -> str | None:
        return next((v for k, v in self.form if k == name), None)


@dataclass
class RequestLog:
    """A thread-safe list of recorded requests."""

    _items: list[RecordedRequest] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def append(self, item: RecordedRequest) -> None:
        with self._lock:
            self._items.append(item)

    def snapshot(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


async def record(request: web.Request, log: RequestLog) -> RecordedRequest:
    """Record ``request`` (reading its form body when it has one) into ``log``."""
    form: tuple[tuple[str, str], ...] = ()
    if request.content_type == "application/x-www-form-urlencoded":
        data = await request.post()
        form = tuple((k, str(v)) for k, v in data.items())
    item = RecordedRequest(
        method=request.method,
        path=request.path,
        query=tuple((k, v) for k, v in request.query.items()),
        headers=tuple((k, v) for k, v in request.headers.items()),
        form=form,
    )
    log.append(item)
    return item


class ThreadedServer(Listening):
    """An aiohttp application served from its own thread and event loop.

    Use as a context manager, or call ``start()``/``stop()``.  ``port`` is chosen by
    the OS when the server binds, so there is no race for it.
    """

    def __init__(self, app: web.Application, *, name: str = "aiohttp-peer") -> None:
        self._app = app
        self._name = self.peer = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise PeerError(f"{self._name} is not running")
        return self._loop

    def start(self, timeout: float = 10.0) -> Self:
        self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise PeerError(f"{self._name} did not start within {timeout}s")
        if self._error is not None:
            raise PeerError(f"{self._name} failed to start: {self._error!r}")
        return self

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._setup())
        except BaseException as err:  # reported to start()
            self._error = err
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._cleanup())
            # Handlers still running (a mirror that hangs on purpose) are cancelled
            # here, not left for the garbage collector to complain about.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _setup(self) -> None:
        # shutdown_timeout bounds how long stop() waits for hanging handlers.
        self._runner = web.AppRunner(self._app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK, 0)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self._port = int(sockets[0].getsockname()[1])

    async def _cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = None
        self._loop = None
        self._port = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ThreadedService:
    """A test peer built on a ThreadedServer (``self._server``): its lifetime and
    address, so each peer only says what it serves."""

    _server: ThreadedServer

    def start(self) -> Self:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self._server.url
