"""A big cold body over TLS is decrypted into the file by a worker thread
(proxyd.decrypting), not by the event loop. Here: that thread's own work, over a TLS
connection shaken hands in memory buffers as asyncio's SSL protocol holds it, and what
`take` takes over. Through proxyd, the same answers and guarantees as a splice of a
plain body: the tests of tests/test_splice.py that take `taken` run over TLS too."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest
import trustme

from proxyd import decrypting, splicing
from proxyd.decrypting import TLSState

LAYER = os.urandom(1 << 20)
READ_TIMEOUT = 0.3


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


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
