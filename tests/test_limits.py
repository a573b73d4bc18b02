"""Nothing a slow peer does holds proxyd's resources for long: a client sending its
request head slowly, a client idling on a kept-alive connection, more clients than
proxyd serves at once (proxyd/server/limits.py), and an upstream dripping a body
(proxyd/pace.py).

The clients are raw TCP connections on 127.0.0.1, since no real client misbehaves on
demand; the dripping upstream is a fake (tests/fakes.py) that holds its last byte
while the test moves proxyd's clock past the window the rate is judged over. Where a
bound is a real timer (aiohttp's loop), the test sets it short and waits for the
event it causes (the connection's end), never for a stretch of time.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.conftest import FakeClock, host, origin, until
from tests.fakes import FakeRegistry, make_image

WITHIN = 10.0  # seconds: a bound for a loaded machine, far above every timeout set here


async def connect(proxyd: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(proxyd.server.host, proxyd.server.port)


async def closed_by_proxyd(reader: asyncio.StreamReader) -> bytes:
    """Everything proxyd sent until it closed the connection."""
    return await asyncio.wait_for(reader.read(), WITHIN)


def connections(proxyd: Any) -> int:
    return len(proxyd.server.runner.server.connections)


async def dropped(proxyd: Any, reason: str) -> float:
    text = await (await proxyd.get("/metrics")).text()
    line = f'proxyd_connections_dropped_total{{reason="{reason}"}} '
    return next((float(t.removeprefix(line)) for t in text.splitlines() if t.startswith(line)), 0)


async def test_a_request_head_trickling_in_is_cut_at_the_header_timeout(make_proxyd):
    """The timeout bounds the whole head from its first byte: a byte every 50 ms
    would keep an idle timer from ever firing."""
    proxyd = await make_proxyd("", header_timeout=0.5)
    reader, writer = await connect(proxyd)
    head = b"GET /v2/ HTTP/1.1\r\nHost: proxyd\r\nX-Slow: " + b"a" * 10_000
    sent = 0
    answer = b""
    while not reader.at_eof():
        # 0.5 s is 10 bytes at this pace: 200 (10 s) only on a machine ever so loaded.
        assert sent < 200, f"{sent} bytes in and not cut: an idle timer, not a bound"
        writer.write(head[sent : sent + 1])
        sent += 1
        try:  # wait for proxyd to close the connection, 50 ms at a time
            answer += await asyncio.wait_for(reader.read(1024), 0.05)
        except TimeoutError:
            continue
    assert answer == b"", "proxyd answered a head it never received in full"
    assert await dropped(proxyd, "header_timeout") == 1
    writer.close()


async def test_a_head_that_arrives_in_pieces_within_the_header_timeout_is_served(make_proxyd):
    proxyd = await make_proxyd("", header_timeout=5)
    reader, writer = await connect(proxyd)
    writer.write(b"GET /v2/ HTTP/1.1\r\nHo")
    await writer.drain()
    writer.write(b"st: proxyd\r\nConnection: close\r\n\r\n")
    answer = await closed_by_proxyd(reader)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    writer.close()


async def test_a_kept_alive_connection_idle_past_the_keepalive_timeout_is_closed(make_proxyd):
    proxyd = await make_proxyd("", keepalive_timeout=0.3)
    reader, writer = await connect(proxyd)
    writer.write(b"GET /v2/ HTTP/1.1\r\nHost: proxyd\r\n\r\n")
    answer = await closed_by_proxyd(reader)  # aiohttp's default would keep it an hour
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close" not in answer, "closed as idle, not after its answer"
    writer.close()


async def test_a_connection_that_never_sends_is_closed_after_the_keepalive_timeout(make_proxyd):
    proxyd = await make_proxyd("", keepalive_timeout=0.3)
    reader, writer = await connect(proxyd)
    assert await closed_by_proxyd(reader) == b""
    writer.close()


async def test_connections_past_max_connections_are_answered_503_and_closed(make_proxyd):
    proxyd = await make_proxyd("", max_connections=2)
    held = [await connect(proxyd) for _ in range(2)]
    await until(lambda: connections(proxyd) == 2)

    reader, writer = await connect(proxyd)
    writer.write(b"GET /v2/ HTTP/1.1\r\nHost: proxyd\r\n\r\n")
    answer = await closed_by_proxyd(reader)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"\r\nRetry-After: 1\r\n" in head
    assert b'"code":"UNAVAILABLE"' in body and b"2 connections" in body
    assert connections(proxyd) == 2, "the refused connection was counted"
    writer.close()

    for _, held_writer in held:  # room again: served as ever
        held_writer.close()
    await until(lambda: connections(proxyd) == 0)
    assert (await proxyd.get("/v2/")).status == 200
    assert await dropped(proxyd, "max_connections") == 1


async def test_an_upstream_dripping_a_blob_below_the_minimum_rate_is_cut(
    make_proxyd, start_fake, cache_dir
):
    """A read timeout resets with every byte; the minimum rate is judged over a minute
    of proxyd's clock, so the drip is cut and counted as the host's failure."""
    upstream = FakeRegistry(gate=asyncio.Event())  # holds the last byte
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    clock = FakeClock()
    proxyd = await make_proxyd(
        f'default_namespace = "{host(server)}"\n'
        f'[namespaces."{host(server)}"]\nserver = "{origin(server)}"',
        clock=clock,
        min_transfer_rate=1024,
    )
    response = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    assert response.status == 200
    assert len(await response.content.readexactly(1000)) == 1000
    clock.advance(61)  # all but one byte of 12 KB in a minute: below 1 KiB/s
    assert upstream.gate is not None
    upstream.gate.set()
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    metrics = await (await proxyd.get("/metrics")).text()
    assert f'proxyd_upstream_errors_total{{host="{host(server)}",reason="timeout"}} 1.0' in metrics
    assert not (cache_dir / "blobs" / "sha256" / image.layer.split(":")[1]).exists()


async def test_an_upstream_within_the_minimum_rate_is_not_cut(make_proxyd, start_fake):
    upstream = FakeRegistry(gate=asyncio.Event())
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    clock = FakeClock()
    proxyd = await make_proxyd(
        f'default_namespace = "{host(server)}"\n'
        f'[namespaces."{host(server)}"]\nserver = "{origin(server)}"',
        clock=clock,
        min_transfer_rate=100,  # 12 KB in a minute is 200 bytes/s
    )
    response = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    assert len(await response.content.readexactly(1000)) == 1000
    clock.advance(60)
    assert upstream.gate is not None
    upstream.gate.set()
    assert len(await response.read()) == len(image.blobs[image.layer]) - 1000
