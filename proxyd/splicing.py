"""Bytes from a socket into a file inside the kernel: splice(2) through a pipe.

A cold blob read by the event loop crossed into the process and out of it again
(`recv`, the HTTP parser's copy, `writev`, and `send` to each client): on a cold
1 GiB blob from a plain-http upstream that was a core's second of CPU on the loop
alone. Spliced, the bytes go from the socket's buffers to the page cache without
entering the process; the clients take them from there with sendfile and the hash
reads them mapped (`BlobWriter.splice`). This runs in a thread of its own (it lasts as
long as the body, at the upstream's pace: in a shared pool it would hold up the
work queued behind it; at most `MAX_SPLICES` run at once): it blocks in
`poll` while the socket is empty, at most `timeout` seconds (a stalled upstream is a
timeout, as aiohttp's read timeout makes it), and ends early when told to (`Stop`).

A big body is written with O_DIRECT where the file system takes it (`proxyd.direct`,
which shares this module's `Stop` and waits); the splice is for the others.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
from collections.abc import Callable

SPLICE_READ = 1 << 20  # the most one splice from the socket moves (the pipe's size)
# Splices at once, each two threads of its own for as long as its body takes (the
# splice, and the hash that follows it): more bodies meanwhile are read by the loop.
MAX_SPLICES = 16
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, named in Python 3.10+ but not in typeshed's


class Stopped(Exception):
    """The splice was told to stop (its download was cancelled)."""


class Stop:
    """Tells a splice in a worker thread to end: a pipe its `poll` watches too."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    @property
    def fd(self) -> int:
        return self._read

    def set(self) -> None:
        with contextlib.suppress(BlockingIOError):  # told already
            os.write(self._write, b"x")

    def close(self) -> None:
        """Once the splice has ended (its thread may poll the descriptor until then)."""
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)


def splice_into(
    source: int,
    target: int,
    count: int,
    *,
    timeout: float,
    stop: Stop,
    moved: Callable[[int], None],
) -> None:
    """Move `count` bytes from the non-blocking socket `source` to the end of the file
    `target`, calling `moved(n)` after each `n` bytes reached the file (it may raise,
    to end the splice: a body too slow). Raises TimeoutError after `timeout` seconds
    without a byte, ConnectionAbortedError if the connection ends short of `count`,
    `Stopped` once `stop` is set."""
    pipe_out, pipe_in = os.pipe2(os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):  # the system's limit may be lower: 64 KiB then
            fcntl.fcntl(pipe_in, _F_SETPIPE_SZ, SPLICE_READ)
        poller = watch(source, stop)
        left = count
        while left:
            try:
                taken = os.splice(source, pipe_in, min(left, SPLICE_READ), flags=_FLAGS)
            except BlockingIOError:
                wait_readable(poller, stop, timeout)
                continue
            if taken == 0:
                raise ConnectionAbortedError(
                    f"the connection closed after {count - left} of {count} bytes"
                )
            done = 0
            while done < taken:  # the pipe into the file: a file never makes it wait
                done += os.splice(pipe_out, target, taken - done, flags=os.SPLICE_F_MOVE)
            left -= taken
            moved(taken)
    finally:
        os.close(pipe_out)
        os.close(pipe_in)


_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


def watch(source: int, stop: Stop) -> select.poll:
    """A poll of the socket `source` and of `stop`, for `wait_readable` and `told`."""
    poller = select.poll()
    poller.register(source, select.POLLIN)
    poller.register(stop.fd, select.POLLIN)
    return poller


def told(poller: select.poll, stop: Stop) -> bool:
    """Whether `stop` is set (a body that never waits is told between its moves)."""
    return any(fd == stop.fd for fd, _ in poller.poll(0))


def wait_readable(poller: select.poll, stop: Stop, timeout: float) -> None:
    """Until the socket has bytes (or an error or its end, which the next splice
    reports); raises Stopped or TimeoutError."""
    events = poller.poll(timeout * 1000)
    if not events:
        raise TimeoutError(f"no byte for {timeout:g} s")
    if any(fd == stop.fd for fd, _ in events):
        raise Stopped
