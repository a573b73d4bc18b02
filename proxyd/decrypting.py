"""A TLS body decrypted into a file by a worker thread, off the event loop.

Docker Hub, ghcr and ECR answer over https, whose bytes cannot be spliced
(`proxyd.splicing`): they must be decrypted in the process. asyncio decrypts on the
event loop (its SSL protocol), and each chunk then crossed the HTTP parser, the
write-behind and the clients' writes there: over a GiB's cold GET, more than a second of
the loop's CPU. Here a worker thread takes over the connection's TLS state once the
response's head is read (`take`): it reads the socket, decrypts into a buffer and
writes the file a batch at a time, as a splice moves a plain body, while the hash
follows the file and the clients follow it with sendfile (`BlobWriter.splice`).
Where the file system takes O_DIRECT, the thread instead decrypts into memory the
clients are sent from (`reader`, used by `proxyd.direct`).

The thread owns the TLS object for as long as the body takes. `take` stops asyncio's
reading of the socket for good, so that the loop never touches that object meanwhile;
the connection is closed once the response is released, after the thread ended (the
loop then sends the TLS close), and never reused: the HTTP parser never saw the body.
It waits in `poll` while the socket is empty, at most `timeout` seconds, and ends when
told (`splicing.Stop`), as a splice does. A TLS failure in the body (a record that does
not authenticate, a close before the last byte) is the connection's failure
(`ConnectionAbortedError`), as a body that breaks off.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from proxyd import splicing

BATCH = 1 << 20  # decrypted bytes written to the file at once (what `moved` announces)
RAW_READ = 256 << 10  # the most one read from the socket takes (asyncio's own size)


@dataclass(frozen=True)
class TLSState:
    """A connection's TLS object and the buffer of received bytes it decrypts from,
    taken from asyncio's SSL protocol (`take`)."""

    sslobj: ssl.SSLObject
    incoming: ssl.MemoryBIO


def take(transport: Any) -> TLSState | None:
    """The TLS state of `transport` (asyncio's TLS transport), with the event loop's
    reading of the socket stopped for good; None where it is not asyncio's own SSL
    protocol straight on a socket (then nothing is changed). The caller pauses the
    reading of the decrypted bytes by aiohttp's protocol right after, taking what it
    holds already."""
    protocol: Any = getattr(transport, "_ssl_protocol", None)
    sslobj = getattr(protocol, "_sslobj", None)
    incoming = getattr(protocol, "_incoming", None)
    socket_transport: Any = getattr(protocol, "_transport", None)
    if (
        not isinstance(sslobj, ssl.SSLObject)
        or not isinstance(incoming, ssl.MemoryBIO)
        or not hasattr(socket_transport, "pause_reading")
        or not isinstance(getattr(protocol, "_ssl_reading_paused", None), bool)
        # TLS inside TLS (an https upstream through an https proxy): the socket carries
        # the proxy's records, which this TLS object cannot read
        or socket_transport.get_extra_info("sslcontext") is not None
    ):
        return None
    socket_transport.pause_reading()
    # The protocol resumes the socket's reading only where it paused it itself (its
    # buffer of received bytes was full); as it now believes it did not, it never will.
    protocol._ssl_reading_paused = False
    return TLSState(sslobj, incoming)


def decrypt_into(
    source: int,
    target: int,
    count: int,
    *,
    tls: TLSState,
    timeout: float,
    stop: splicing.Stop,
    moved: Callable[[int], None],
) -> None:
    """Decrypt `count` bytes of the TLS connection on the non-blocking socket `source`
    to the end of the file `target`, calling `moved(n)` after each `n` bytes reached the
    file (it may raise, to end it: a body too slow). Raises what `splicing.splice_into`
    raises, in the same cases; a TLS error is a ConnectionAbortedError."""
    out = bytearray(min(count, BATCH))
    view = memoryview(out)
    poller = splicing.watch(source, stop)
    fill = reader(source, tls)
    done = 0
    while done < count:
        want = min(count - done, BATCH)
        filled = 0
        while filled < want:
            got = fill(view[filled:want])
            if got is None:
                splicing.wait_readable(poller, stop, timeout)
                continue
            if got == 0:
                raise _short(done + filled, count)
            filled += got
        _write_all(target, view[:filled])
        done += filled
        moved(filled)
        if splicing.told(poller, stop):  # a body that never waits ends when told, too
            raise splicing.Stopped


def reader(source: int, tls: TLSState) -> Callable[[memoryview], int | None]:
    """Decrypted reads of the TLS connection on the non-blocking socket `source`, none
    waiting: each fills some of the view it is given (the count; 0 at the server's
    close; None when the socket has nothing now). A TLS error is a
    ConnectionAbortedError."""
    raw = memoryview(bytearray(RAW_READ))
    # `read(n, buffer)` decrypts into the buffer and gives the count (typeshed has it
    # return bytes, as `read(n)` does).
    read_into = cast(Callable[[int, memoryview], int], tls.sslobj.read)
    decrypted = 0

    def fill(view: memoryview) -> int | None:
        nonlocal decrypted
        while True:
            try:
                got = read_into(len(view), view)
            except ssl.SSLWantReadError:
                try:
                    received = os.readv(source, [raw])
                except BlockingIOError:
                    return None
                if received == 0:
                    return 0
                tls.incoming.write(raw[:received])
                continue
            except ssl.SSLZeroReturnError:  # the server's TLS close
                return 0
            except ssl.SSLError as error:
                failed = f"TLS failed after {decrypted} bytes: {error}"
                raise ConnectionAbortedError(failed) from error
            decrypted += got
            return got

    return fill


def _short(so_far: int, count: int) -> ConnectionAbortedError:
    return ConnectionAbortedError(f"the connection closed after {so_far} of {count} bytes")


def _write_all(target: int, data: memoryview) -> None:
    written = 0
    while written < len(data):
        written += os.write(target, data[written:])
