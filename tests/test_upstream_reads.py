"""How a body is read from the upstream socket: `Upstream.chunks()` lets one read take
up to `SOCKET_READ` while the body is read (asyncio's transport takes 256 KiB a
`recv`; over TLS, asyncio's SSL protocol does), and gives the connection its own
reads back once the body ended."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from typing import Any

import aiohttp
import trustme
from aiohttp import web

from proxyd.hosts import Capability, RegistryHost
from proxyd.upstream import SOCKET_READ, Upstream

BODY = hashlib.sha256(b"seed").digest() * (3 * (1 << 20) // 32)  # 3 MiB


def _host() -> RegistryHost:
    return RegistryHost("http", "upstream.test", "/v2", Capability.all(), is_mirror=False)


async def _server(aiohttp_server: Any, context: ssl.SSLContext | None = None) -> Any:
    async def blob(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = len(BODY)
        await response.prepare(request)
        for start in range(0, len(BODY), 1 << 20):
            await response.write(BODY[start : start + (1 << 20)])
        return response

    app = web.Application()
    app.router.add_get("/blob", blob)
    return await aiohttp_server(app, ssl=context)


def _reads(transport: asyncio.BaseTransport) -> int:
    return int(getattr(transport, "max_size"))  # noqa: B009 - asyncio's, not typed


def _transport(response: aiohttp.ClientResponse) -> asyncio.BaseTransport:
    """The transport of the connection `response` came on."""
    connection = response.connection
    assert connection is not None and connection.transport is not None
    return connection.transport


async def test_a_body_is_read_up_to_the_body_buffer_a_read_and_the_connection_reads_as_before_after(
    aiohttp_server: Any,
) -> None:
    server = await _server(aiohttp_server)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        response = await session.get(server.make_url("/blob"))
        transport = _transport(response)
        before = _reads(transport)
        assert before < SOCKET_READ  # asyncio's 256 KiB

        up = Upstream(_host(), response, [])
        body = bytearray()
        during = set()
        async for chunk in up.chunks():
            during.add(_reads(transport))
            body += chunk
        response.release()

        assert bytes(body) == BODY
        assert during == {SOCKET_READ}
        assert _reads(transport) == before  # the class's own again
        # The same connection (a pool of one) serves the next request as before.
        async with session.get(server.make_url("/blob")) as again:
            assert again.connection is not None and again.connection.transport is transport
            assert await again.read() == BODY
            assert _reads(transport) == before


async def test_a_body_read_in_part_leaves_its_connection_closed_not_reused_with_larger_reads(
    aiohttp_server: Any,
) -> None:
    server = await _server(aiohttp_server)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        response = await session.get(server.make_url("/blob"))
        transport = _transport(response)
        async for _ in Upstream(_host(), response, []).chunks():
            break
        response.release()
        async with session.get(server.make_url("/blob")) as again:
            assert again.connection is not None and again.connection.transport is not None
            assert again.connection.transport is not transport
            assert _reads(again.connection.transport) < SOCKET_READ


async def test_a_tls_body_is_read_up_to_socket_read_a_read_and_its_buffer_shrinks_after(
    aiohttp_server: Any,
) -> None:
    ca = trustme.CA()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    server = await _server(aiohttp_server, server_context)
    url = server.make_url("/blob").with_scheme("https")
    connector = aiohttp.TCPConnector(limit=1, ssl=client_context)
    async with aiohttp.ClientSession(connector=connector) as session:
        response = await session.get(url)
        protocol = getattr(_transport(response), "_ssl_protocol")  # noqa: B009 - asyncio's
        before = _reads(protocol)
        assert before < SOCKET_READ  # asyncio's 256 KiB

        body = bytearray()
        during = set()
        async for chunk in Upstream(_host(), response, []).chunks():
            during.add(_reads(protocol))
            body += chunk
        response.release()

        assert bytes(body) == BODY
        assert during == {SOCKET_READ}
        assert _reads(protocol) == before
        assert len(protocol._ssl_buffer) == before  # not kept at SOCKET_READ while pooled
        async with session.get(url) as again:
            assert again.connection is not None and again.connection.transport is not None
            assert getattr(again.connection.transport, "_ssl_protocol") is protocol  # noqa: B009
            assert await again.read() == BODY
