"""When a host cannot be reached, the client's error and proxyd's log say so in words:
the host and port, and the cause as the system names it (`Connection refused`), never
a Python repr (`ssl:<ssl.SSLContext object at 0x…>`). Each common failure is made for
real on 127.0.0.1: a closed port, a name that does not resolve, a handshake with a
server that speaks no TLS or an untrusted certificate, a server that never answers,
one that resets the connection."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trustme
from structlog.testing import capture_logs

from tests.fakes import FakeRegistry, make_image

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
READ_TIMEOUT = 0.3


@asynccontextmanager
async def tcp_server(handle: Handler) -> AsyncIterator[int]:
    """A bare TCP server on 127.0.0.1 running `handle` per connection; its port.
    Closed, with every connection, when the block ends."""
    writers: list[asyncio.StreamWriter] = []

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await handle(reader, writer)

    server = await asyncio.start_server(tracked, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.transport.abort()
        await server.wait_closed()


async def reset_after_the_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await reader.readuntil(b"\r\n\r\n")
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # with SO_LINGER 0: a RST, not a FIN


async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    await asyncio.Event().wait()  # until the server closes it


def config(namespace: str, server: str) -> str:
    return "\n".join(
        [
            f'default_namespace = "{namespace}"',
            f'[namespaces."{namespace}"]',
            f'server = "{server}"',
            f"read_timeout = {READ_TIMEOUT}",
        ]
    )


def texts(value: Any) -> list[str]:
    """Every string inside a log event (keys and values, nested)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in (*texts(k), *texts(v))]
    if isinstance(value, list | tuple):
        return [t for item in value for t in texts(item)]
    return [str(value)]


async def failure_of(make_proxyd: Any, config_text: str) -> tuple[str, list[str]]:
    """The message of the client's 502 for a manifest, and every text logged meanwhile."""
    proxyd = await make_proxyd(config_text)
    with capture_logs() as logs:
        response = await proxyd.get("/v2/team/app/manifests/v1")
        body = await response.read()
    assert response.status == 502, body
    [error] = json.loads(body)["errors"]
    reasons = [e["reason"] for e in logs if e["event"] == "upstream.failed"]
    assert reasons and str(error["message"]).endswith(reasons[-1]), (error, logs)
    return str(error["message"]), [t for event in logs for t in texts(event)]


def assert_in_words(message: str, logged: list[str]) -> None:
    for text in (message, *logged):
        assert "object at 0x" not in text, text
        assert "<" not in text and ">" not in text, text


# -- each failure ----------------------------------------------------------------------


async def test_a_refused_connection_names_the_host_and_says_refused(make_proxyd):
    message, logged = await failure_of(make_proxyd, config("127.0.0.1:1", "http://127.0.0.1:1"))
    assert message.endswith(
        "http://127.0.0.1:1: cannot connect to 127.0.0.1:1 (Connection refused)"
    )
    assert_in_words(message, logged)


async def test_a_name_that_does_not_resolve_says_cannot_resolve(make_proxyd):
    # .invalid never resolves (RFC 6761)
    message, logged = await failure_of(
        make_proxyd, config("registry.invalid", "https://registry.invalid")
    )
    assert "https://registry.invalid: cannot resolve registry.invalid (" in message
    assert_in_words(message, logged)


async def test_tls_to_a_server_that_speaks_plain_http_says_the_handshake_failed(
    make_proxyd, start_fake
):
    upstream = FakeRegistry()
    upstream.add(make_image())
    server = await start_fake(upstream)
    name = f"127.0.0.1:{server.port}"
    message, logged = await failure_of(make_proxyd, config(name, f"https://{name}"))
    assert f"the TLS handshake with {name} failed (" in message
    assert_in_words(message, logged)


async def test_an_untrusted_certificate_says_why_it_is_not_trusted(make_proxyd, aiohttp_server):
    ca = trustme.CA()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    upstream = FakeRegistry()
    upstream.add(make_image())
    server = await aiohttp_server(upstream.app(), host="127.0.0.1", ssl=context)
    name = f"127.0.0.1:{server.port}"
    message, logged = await failure_of(make_proxyd, config(name, f"https://{name}"))
    assert f"the TLS certificate of {name} is not trusted (unable to get local issuer" in message
    assert_in_words(message, logged)


async def test_a_server_that_never_answers_says_timed_out(make_proxyd):
    async with tcp_server(never_answer) as port:
        name = f"127.0.0.1:{port}"
        started = time.monotonic()
        message, logged = await failure_of(make_proxyd, config(name, f"http://{name}"))
    assert time.monotonic() - started < READ_TIMEOUT + 3
    assert message.endswith(f"http://{name}: timed out")
    assert_in_words(message, logged)


async def test_a_reset_connection_says_the_connection_broke(make_proxyd):
    async with tcp_server(reset_after_the_request) as port:
        name = f"127.0.0.1:{port}"
        message, logged = await failure_of(make_proxyd, config(name, f"http://{name}"))
    assert message.endswith(
        (
            f"http://{name}: the connection failed (Connection reset by peer)",
            f"http://{name}: the server closed the connection before it answered in full",
        )
    ), message
    assert_in_words(message, logged)


async def test_a_manifest_body_cut_short_says_the_answer_broke_off(make_proxyd, start_fake):
    upstream = FakeRegistry(drop_manifests_after=10)
    upstream.add(make_image())
    server = await start_fake(upstream)
    name = f"127.0.0.1:{server.port}"
    message, logged = await failure_of(make_proxyd, config(name, f"http://{name}"))
    assert "broke off: the body was cut short (Not enough data" in message
    assert_in_words(message, logged)


async def test_a_token_server_that_cannot_be_reached_is_said_in_words(make_proxyd, start_fake):
    """The registry's challenge names a realm on a closed port."""
    upstream = FakeRegistry(bearer_realm="http://127.0.0.1:1/token")
    upstream.add(make_image())
    server = await start_fake(upstream)
    name = f"127.0.0.1:{server.port}"
    message, logged = await failure_of(make_proxyd, config(name, f"http://{name}"))
    assert "unreachable: cannot connect to 127.0.0.1:1 (Connection refused)" in message
    assert_in_words(message, logged)
