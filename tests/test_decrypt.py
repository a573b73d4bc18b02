"""A big cold blob from an https upstream is decrypted into the file by a worker thread
(proxyd.decrypting), not by the event loop: the same answers and guarantees as a
splice of a plain body (tests/test_splice.py), over TLS. `SPLICE_FROM` is lowered here
so that the 1 MiB layers of the fakes take that path; `decrypted` counts the bodies
decrypted so, so that each test shows it did."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from proxyd import decrypting, splicing, upstream
from proxyd.decrypting import TLSState
from tests.conftest import until, until_stored
from tests.fakes import FakeRegistry, make_image

LAYER = os.urandom(1 << 20)
READ_TIMEOUT = 0.3


@pytest.fixture
def decrypted(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Bodies of any length are taken off the loop; the list holds each one's count."""
    counts: list[int] = []
    real = decrypting.decrypt_into

    def counting(source: int, target: int, count: int, **kwargs: Any) -> None:
        counts.append(count)
        real(source, target, count, **kwargs)

    monkeypatch.setattr(upstream, "SPLICE_FROM", 0)
    monkeypatch.setattr(decrypting, "decrypt_into", counting)
    yield counts


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture
def over_tls(aiohttp_server: Any, make_proxyd: Any, ca: trustme.CA, tmp_path: Path) -> Any:
    """proxyd in front of `fake`, served over TLS by a certificate of `ca`."""

    async def start(fake: FakeRegistry, *extra: str) -> Any:
        server = await aiohttp_server(fake.app(), host="127.0.0.1", ssl=server_context(ca))
        ca_pem = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_pem))
        name = f"127.0.0.1:{server.port}"
        lines = [
            f'default_namespace = "{name}"',
            f'[namespaces."{name}"]',
            f'server = "https://{name}"',
            f'ca = "{ca_pem}"',
            *extra,
        ]
        return await make_proxyd("\n".join(lines))

    return start


def stored(cache_dir: Path, digest: str) -> Path:
    return cache_dir / "blobs" / "sha256" / digest.split(":")[1]


async def test_a_cold_blob_over_tls_is_decrypted_off_the_loop_served_whole_and_stored(
    over_tls, cache_dir: Path, decrypted: list[int]
):
    fake = FakeRegistry()
    image = fake.add(make_image(layer=LAYER))
    proxyd = await over_tls(fake)

    response = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    assert response.status == 200
    assert await response.read() == LAYER
    assert len(decrypted) == 1 and 0 < decrypted[0] <= len(LAYER)  # past the head's bytes
    assert (await until_stored(cache_dir, image.layer)).read_bytes() == LAYER
    ranged = await proxyd.get(f"/v2/team/app/blobs/{image.layer}", headers={"Range": "bytes=5-9"})
    assert await ranged.read() == LAYER[5:10]


async def test_clients_joining_a_decrypted_body_get_every_byte_once_it_is_verified(
    over_tls, cache_dir: Path, decrypted: list[int]
):
    fake = FakeRegistry(gate=asyncio.Event())  # the last byte waits for the test
    image = fake.add(make_image(layer=LAYER))
    proxyd = await over_tls(fake)
    path = f"/v2/team/app/blobs/{image.layer}"

    first = await proxyd.get(path)
    await until(lambda: bool(decrypted))
    whole, part = await proxyd.get(path), await proxyd.get(path, headers={"Range": "bytes=10-"})
    assert fake.gate is not None
    fake.gate.set()

    assert [await r.read() for r in (first, whole, part)] == [LAYER, LAYER, LAYER[10:]]
    assert len(fake.requests(f"/blobs/{image.layer}")) == 1
    await until_stored(cache_dir, image.layer)


async def test_a_corrupt_blob_over_tls_is_cut_short_and_stores_nothing(
    over_tls, cache_dir: Path, decrypted: list[int]
):
    fake = FakeRegistry(corrupt=True)
    image = fake.add(make_image(layer=LAYER))
    proxyd = await over_tls(fake)

    response = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    assert decrypted
    assert not stored(cache_dir, image.layer).exists()
    await until(lambda: not any((cache_dir / "tmp").iterdir()))


async def test_a_body_over_tls_that_breaks_off_is_cut_short_and_fetched_again_next_time(
    over_tls, cache_dir: Path, decrypted: list[int]
):
    fake = FakeRegistry(drop_after=len(LAYER) // 2)
    image = fake.add(make_image(layer=LAYER))
    proxyd = await over_tls(fake)
    path = f"/v2/team/app/blobs/{image.layer}"

    response = await proxyd.get(path)
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    assert decrypted
    assert not stored(cache_dir, image.layer).exists()

    fake.drop_after = None
    assert await (await proxyd.get(path)).read() == LAYER
    await until_stored(cache_dir, image.layer)


async def test_a_body_over_tls_that_stalls_is_cut_by_the_read_timeout(
    over_tls, cache_dir: Path, decrypted: list[int]
):
    fake = FakeRegistry(gate=asyncio.Event())  # never set: the last byte never comes
    image = fake.add(make_image(layer=LAYER))
    proxyd = await over_tls(fake, f"read_timeout = {READ_TIMEOUT}")

    started = time.monotonic()
    response = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(response.read(), 10)
    assert decrypted
    assert time.monotonic() - started < READ_TIMEOUT + 5
    assert not stored(cache_dir, image.layer).exists()


async def test_manifests_and_small_blobs_over_the_same_host_are_read_by_the_loop(
    over_tls, decrypted: list[int], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(upstream, "SPLICE_FROM", len(LAYER) + 1)
    fake = FakeRegistry()
    image = fake.add(make_image(layer=LAYER))
    proxyd = await over_tls(fake)
    for digest, body in image.blobs.items():
        assert await (await proxyd.get(f"/v2/team/app/blobs/{digest}")).read() == body
    assert decrypted == []


def tls_connection(ca: trustme.CA) -> tuple[socket.socket, TLSState, ssl.SSLSocket]:
    """A TLS connection over a socket pair, shaken hands: our end non-blocking with its
    TLS state in memory buffers, as asyncio's SSL protocol holds it, and the server's
    end a blocking TLS socket."""
    ours, theirs = socket.socketpair()
    servers: list[ssl.SSLSocket] = []
    accepting = threading.Thread(
        target=lambda: servers.append(server_context(ca).wrap_socket(theirs, server_side=True))
    )
    accepting.start()
    client = ssl.create_default_context()
    ca.configure_trust(client)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = client.wrap_bio(incoming, outgoing, server_hostname="localhost")
    while True:
        try:
            sslobj.do_handshake()
            break
        except ssl.SSLWantReadError:
            ours.sendall(outgoing.read())
            incoming.write(ours.recv(1 << 16))
    ours.sendall(outgoing.read())
    accepting.join(10)
    ours.setblocking(False)
    return ours, TLSState(sslobj, incoming), servers[0]


def test_a_tls_body_is_decrypted_into_the_file_a_batch_at_a_time(tmp_path: Path, ca: trustme.CA):
    ours, tls, server = tls_connection(ca)
    data = os.urandom(3 * decrypting.BATCH + 12345)
    target = os.open(tmp_path / "file", os.O_WRONLY | os.O_CREAT)
    moves: list[int] = []
    stop = splicing.Stop()
    with ours, server:
        sender = threading.Thread(target=server.sendall, args=(data,))
        sender.start()
        decrypting.decrypt_into(
            ours.fileno(), target, len(data), tls=tls, timeout=10, stop=stop, moved=moves.append
        )
        sender.join()
    os.close(target)
    stop.close()
    assert moves == [decrypting.BATCH] * 3 + [12345]
    assert (tmp_path / "file").read_bytes() == data


@pytest.mark.parametrize("fault", ["closed", "tls closed", "garbled", "silent", "stopped"])
def test_a_tls_body_ends_on_a_short_body_a_bad_record_silence_or_its_stop(
    tmp_path: Path, ca: trustme.CA, fault: str
):
    ours, tls, server = tls_connection(ca)
    target = os.open(tmp_path / "file", os.O_WRONLY | os.O_CREAT)
    stop = splicing.Stop()
    server.sendall(b"x" * 1000)
    if fault == "closed":
        server.shutdown(socket.SHUT_WR)  # the connection ends, with no TLS close
    if fault == "tls closed":
        server.settimeout(0.2)  # the TLS close goes out; the answer to it never comes
        with contextlib.suppress(TimeoutError):
            server.unwrap()
    if fault == "garbled":
        os.write(server.fileno(), b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # a record of noise
    if fault == "stopped":
        stop.set()
    expected = {
        "closed": ConnectionAbortedError,
        "tls closed": ConnectionAbortedError,
        "garbled": ConnectionAbortedError,
        "silent": TimeoutError,
        "stopped": splicing.Stopped,
    }[fault]
    try:
        with pytest.raises(expected):
            decrypting.decrypt_into(
                ours.fileno(), target, 2000, tls=tls, timeout=0.05, stop=stop, moved=lambda n: None
            )
    finally:
        ours.close()
        server.close()
        os.close(target)
        stop.close()


def test_a_stop_told_while_the_body_flows_ends_it_after_the_batch_in_hand(
    tmp_path: Path, ca: trustme.CA
):
    ours, tls, server = tls_connection(ca)
    target = os.open(tmp_path / "file", os.O_WRONLY | os.O_CREAT)
    stop = splicing.Stop()

    def send() -> None:
        with contextlib.suppress(OSError):  # until our end is closed
            server.sendall(os.urandom(4 * decrypting.BATCH))

    sender = threading.Thread(target=send)
    sender.start()
    try:
        with pytest.raises(splicing.Stopped):
            decrypting.decrypt_into(
                ours.fileno(),
                target,
                4 * decrypting.BATCH,
                tls=tls,
                timeout=10,
                stop=stop,
                moved=lambda n: stop.set(),
            )
    finally:
        ours.close()
        sender.join(10)
        server.close()
        os.close(target)
        stop.close()
    assert os.path.getsize(tmp_path / "file") == decrypting.BATCH


class FakeSocketTransport:
    def __init__(self, sslcontext: ssl.SSLContext | None) -> None:
        self.sslcontext = sslcontext
        self.reading = True

    def get_extra_info(self, name: str) -> Any:
        return self.sslcontext if name == "sslcontext" else None

    def pause_reading(self) -> None:
        self.reading = False


class FakeSSLProtocol:
    """asyncio's SSL protocol as `take` sees it, over `under`."""

    def __init__(self, under: FakeSocketTransport) -> None:
        self._sslobj = ssl.create_default_context().wrap_bio(
            ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="localhost"
        )
        self._incoming = ssl.MemoryBIO()
        self._transport = under
        self._ssl_reading_paused = False


class FakeTLSTransport:
    def __init__(self, protocol: Any) -> None:
        self._ssl_protocol = protocol


def test_only_asyncios_own_tls_protocol_straight_on_a_socket_is_taken_over():
    plain = FakeSocketTransport(None)
    assert decrypting.take(FakeTLSTransport(FakeSSLProtocol(plain))) is not None
    assert not plain.reading

    # TLS inside TLS (an https upstream through an https proxy): the proxy's records
    inside = FakeSocketTransport(ssl.create_default_context())
    assert decrypting.take(FakeTLSTransport(FakeSSLProtocol(inside))) is None
    assert inside.reading  # nothing was changed
    assert decrypting.take(FakeTLSTransport(object())) is None  # another library's
    assert decrypting.take(object()) is None


async def test_once_taken_the_loop_never_reads_the_socket_again(ca: trustme.CA):
    """Not even where asyncio's SSL protocol had paused the socket itself (its buffer of
    received bytes full) and its own flow control would resume it as the buffer drains:
    the thread that decrypts owns the TLS object and its buffer from then on."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"x" * 100)
        await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_context(ca))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    port = server.sockets[0].getsockname()[1]
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client, server_hostname="localhost"
    )
    try:
        protocol: Any = writer.transport._ssl_protocol  # type: ignore[attr-defined]
        socket_transport = protocol._transport
        protocol._ssl_reading_paused = True  # as after a full buffer
        socket_transport.pause_reading()

        assert decrypting.take(writer.transport) is not None
        protocol._control_ssl_reading()  # the buffer is empty: it would resume the socket
        assert not socket_transport.is_reading()
    finally:
        writer.close()
        server.close()
        await server.wait_closed()
