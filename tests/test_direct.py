"""The thread that takes a big body off the loop with O_DIRECT (`proxyd.direct`): what
it reads reaches the loop as it comes and the disk a slot at a time, hashed in order,
with no more than the ring read ahead of the disk; it ends on a short body, silence,
its stop, a stalled disk or a failed write, and falls back to ordinary writes where
the file system refuses O_DIRECT's alignment. (Its use by a download, end to end:
tests/test_splice.py.)"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from proxyd import direct, splicing
from proxyd.direct import Files
from proxyd.reference import Digest
from proxyd.store import BlobStore


@dataclass
class Run:
    """What one `receive` reported: the chunks handed to the loop, the byte counts
    written, and the most read ahead of the disk at any hand-over."""

    chunks: list[bytes] = field(default_factory=list)
    writes: list[int] = field(default_factory=list)
    ahead: int = 0

    def written(self, size: int, release: Callable[[], None]) -> None:
        self.writes.append(size)
        release()

    def arrived(self, chunk: memoryview) -> None:
        self.chunks.append(chunk)
        self.ahead = max(self.ahead, sum(map(len, self.chunks)) - sum(self.writes))


@dataclass
class Body:
    """A socket to read (ours, non-blocking), its sending end, a file to write."""

    ours: socket.socket
    theirs: socket.socket
    path: Path
    files: Files
    stop: splicing.Stop

    def receive(
        self, count: int, run: Run, *, head: bytes = b"", timeout: float = 10
    ) -> hashlib._Hash:
        digest = hashlib.sha256()
        direct.receive(
            direct.plain_reader(self.ours.fileno()),
            count,
            head=head,
            files=self.files,
            hash=digest,
            poller=splicing.watch(self.ours.fileno(), self.stop),
            stop=self.stop,
            timeout=timeout,
            arrived=run.arrived,
            written=run.written,
        )
        return digest


@pytest.fixture
def body(tmp_path: Path) -> Iterator[Body]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    path = tmp_path / "file"
    buffered = os.open(path, os.O_RDWR | os.O_CREAT)
    opened = direct.open_direct(str(path))
    assert opened is not None, "the test's file system takes O_DIRECT"
    stop = splicing.Stop()
    with ours, theirs:
        yield Body(ours, theirs, path, Files(opened, buffered), stop)
    os.close(opened)
    os.close(buffered)
    stop.close()


def send(sock: socket.socket, data: bytes) -> threading.Thread:
    """Sends `data` from another thread, until it is all sent or the reader is gone."""

    def sending() -> None:
        with contextlib.suppress(OSError):
            sock.sendall(data)

    sender = threading.Thread(target=sending)
    sender.start()
    return sender


def test_a_body_reaches_the_loop_as_it_comes_and_the_disk_in_order_hashed(body: Body):
    head = os.urandom(1000)
    data = os.urandom(9 * direct.SLOT + 12345)  # more than the ring; an unaligned tail
    run = Run()
    sender = send(body.theirs, data)
    digest = body.receive(len(data), run, head=head)
    sender.join()

    assert b"".join(run.chunks) == head + data
    assert max(map(len, run.chunks)) <= direct.SLOT
    assert sum(run.writes) == len(head + data)
    assert digest.hexdigest() == hashlib.sha256(head + data).hexdigest()
    assert body.path.read_bytes() == head + data
    assert run.ahead <= direct.SLOTS * direct.SLOT  # the ring bounds the memory


def test_bytes_reach_the_loop_when_the_socket_runs_dry_before_a_slot_fills(body: Body):
    run = Run()
    body.theirs.sendall(b"a" * 1000)
    receiving = threading.Thread(target=body.receive, args=(3000, run))
    receiving.start()
    deadline = threading.Event()
    while not run.chunks and not deadline.wait(0.01):
        pass
    assert run.chunks == [b"a" * 1000] and run.writes == []  # on the loop, not on disk yet
    body.theirs.sendall(b"b" * 2000)
    receiving.join(10)
    assert b"".join(run.chunks) == b"a" * 1000 + b"b" * 2000
    assert run.writes == [3000]


@pytest.mark.parametrize("fault", ["closed", "silent", "stopped"])
def test_a_body_ends_on_a_short_body_silence_or_its_stop(body: Body, fault: str):
    body.theirs.sendall(b"x" * 1000)
    if fault == "closed":
        body.theirs.close()
    if fault == "stopped":
        body.stop.set()
    expected = {
        "closed": ConnectionAbortedError,
        "silent": TimeoutError,
        "stopped": splicing.Stopped,
    }[fault]
    with pytest.raises(expected):
        body.receive(2000, Run(), timeout=0.05)


def test_a_stalled_disk_ends_the_body_once_every_slot_waits_for_it(
    body: Body, monkeypatch: pytest.MonkeyPatch
):
    """The disk is a stall like a silent socket: after the read timeout, not never
    (and once the write in hand returns: no write can be called back)."""
    disk = threading.Event()
    threading.Timer(0.5, disk.set).start()
    real = direct._write_at

    def stalled(fd: int, data: memoryview, offset: int) -> None:
        disk.wait(10)
        real(fd, data, offset)

    monkeypatch.setattr(direct, "_write_at", stalled)
    data = os.urandom((direct.SLOTS + 2) * direct.SLOT)
    sender = send(body.theirs, data)
    with pytest.raises(TimeoutError, match="disk"):
        body.receive(len(data), Run(), timeout=0.2)
    body.ours.shutdown(socket.SHUT_RDWR)  # (the sender may still be sending)
    sender.join()


def test_a_failed_write_ends_the_body_with_its_error(body: Body, monkeypatch: pytest.MonkeyPatch):
    def full(fd: int, data: memoryview, offset: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct, "_write_at", full)
    data = os.urandom(3 * direct.SLOT)
    sender = send(body.theirs, data)
    with pytest.raises(OSError, match="No space"):
        body.receive(len(data), Run())
    body.ours.shutdown(socket.SHUT_RDWR)  # (the sender may still be sending)
    sender.join()


def test_where_the_alignment_is_refused_the_rest_is_written_the_ordinary_way(
    body: Body, monkeypatch: pytest.MonkeyPatch
):
    real = direct._write_at
    direct_writes: list[int] = []

    def refusing(fd: int, data: memoryview, offset: int) -> None:
        if fd == body.files.direct:
            direct_writes.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd, data, offset)

    monkeypatch.setattr(direct, "_write_at", refusing)
    data = os.urandom(3 * direct.SLOT + 100)
    sender = send(body.theirs, data)
    body.receive(len(data), Run())
    sender.join()
    assert direct_writes == [0]  # tried once
    assert body.path.read_bytes() == data


def test_a_plain_body_below_plain_from_is_left_to_the_splice_unread(tmp_path: Path):
    """Through warm page-cache pages a plain body's splice is the cheaper path."""
    blob_store = BlobStore(tmp_path)
    blob_store.open()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    stop = splicing.Stop()
    with ours, theirs, blob_store.writer(Digest.parse("sha256:" + "0" * 64)) as writer:
        theirs.sendall(b"x" * 100)
        taken = writer.receive(
            ours.fileno(),
            b"",
            direct.PLAIN_FROM - 1,
            timeout=1,
            stop=stop,
            arrived=lambda view: None,
            written=lambda size, release: None,
        )
        assert taken is False
        assert ours.recv(1000) == b"x" * 100  # nothing was read
    stop.close()
