"""One address in front of several replicas, as a Kubernetes Service or a load balancer
without affinity: each HTTP request goes to the next replica in turn, whatever
connection it came on (a client's keep-alive connection does not pin it).

``RoundRobin([url_a, url_b, url_c]).start()`` serves on 127.0.0.1 from a thread of its
own (``tests.peers.httpserver``); request and response bodies are streamed both ways,
never held whole, and ``Host`` is rewritten to the replica's. ``served()`` lists
``(replica index, method, path)`` for every request relayed, in order.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import AsyncIterator, Sequence

import aiohttp
from aiohttp import hdrs, web

from tests.peers import loopback_url
from tests.peers.httpserver import ThreadedServer, ThreadedService

# Hop-by-hop headers (RFC 9110 7.6.1) and those the relay sets itself.
_NOT_RELAYED = frozenset(
    h.lower()
    for h in (
        hdrs.CONNECTION,
        hdrs.KEEP_ALIVE,
        hdrs.PROXY_AUTHENTICATE,
        hdrs.PROXY_AUTHORIZATION,
        hdrs.TE,
        hdrs.TRAILER,
        hdrs.TRANSFER_ENCODING,
        hdrs.UPGRADE,
        hdrs.HOST,
    )
)
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)


class RoundRobin(ThreadedService):
    def __init__(self, replicas: Sequence[str]) -> None:
        self.replicas = [loopback_url(url) for url in replicas]
        self._turn = itertools.cycle(range(len(self.replicas)))
        self._served: list[tuple[int, str, str]] = []
        self._lock = threading.Lock()
        app = web.Application(client_max_size=0)
        app.cleanup_ctx.append(self._client)
        app.router.add_route("*", "/{tail:.*}", self._relay)
        self._server = ThreadedServer(app, name="round-robin")

    @property
    def host(self) -> str:
        return self._server.host

    def served(self) -> list[tuple[int, str, str]]:
        with self._lock:
            return list(self._served)

    async def _client(self, app: web.Application) -> AsyncIterator[None]:
        self._session = aiohttp.ClientSession(
            auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
        )
        yield
        await self._session.close()

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            index = next(self._turn)
            self._served.append((index, request.method, request.path))
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _NOT_RELAYED]
        body = request.content.iter_any() if request.body_exists else None
        async with self._session.request(
            request.method,
            self.replicas[index] + request.path_qs,
            headers=headers,
            data=body,
            allow_redirects=False,
            timeout=TIMEOUT,
        ) as answer:
            response = web.StreamResponse(status=answer.status, reason=answer.reason)
            for name, value in answer.headers.items():
                if name.lower() not in _NOT_RELAYED:
                    response.headers.add(name, value)
            await response.prepare(request)
            if request.method != hdrs.METH_HEAD:
                async for chunk in answer.content.iter_any():
                    await response.write(chunk)
            await response.write_eof()
            return response
