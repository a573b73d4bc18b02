"""A big body written to its file with O_DIRECT, and given to its clients from memory.

A page-cache page written for the first time is the slow part of a big cold blob
where memory is handed out lazily: a VM whose host takes back free memory (free page
reporting, balloons), a node with little free memory, a cgroup that counts the page
cache. On the project's VMs, writing 4 GiB into the page cache took 8 to 12 s of system
time; the same bytes written with O_DIRECT from a buffer used again and again, 1.9 s
(docs/performance.md). Spliced (`proxyd.splicing`) or decrypted (`proxyd.decrypting`)
bodies went through the page cache twice: written, then sent from it.

Here a worker thread reads the body (from the plain socket, or decrypted from the
TLS connection) into slots of `SLOT` bytes of aligned memory and hands the loop views
of them as the bytes arrive (`arrived`: the clients send from them, no copy made);
two threads of their own follow it, one hashing each slot, one writing it with
O_DIRECT (the unaligned tail of the last slot through the file's ordinary
descriptor), saying what reached the disk (`written`). A slot is never written again
while a view of it lives (the loop's clients may keep one for as long as their
socket takes: `_Memory`). At most `SLOTS` are in flight (filled, and not yet hashed,
written and let go by the loop), so the body is read no faster than the disk takes
it and the loop follows, and the memory held is a few slots whatever the body's
size. Nothing of the body stays in the page cache: the first reader after it reads
the disk.

A plain-http body smaller than `PLAIN_FROM` is spliced instead (`proxyd.splicing`).
`open_direct` says whether the file system takes O_DIRECT (tmpfs before Linux 6.6,
some FUSE and network file systems do not): where it does not, the body is spliced
or decrypted as before. A write the file system refuses for its alignment
(EINVAL) is made again without O_DIRECT, and so is the rest of the body.
"""

from __future__ import annotations

import errno
import functools
import mmap
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Protocol

from proxyd import splicing

SLOT = 1 << 20  # bytes read, hashed and written at once
# Slots in flight: the most read ahead of the slowest of the hash, the disk and the
# loop. 3 against 2 or 4 (a cold GiB, 3 runs each): 1.41 s and 60 MiB of peak RSS,
# 1.63 s and 59 MiB, 1.39 s and 61 MiB (docs/performance.md).
SLOTS = 3
KEPT = SLOTS + 2  # slots a body keeps mapped for use again: those in flight, and two
# Bytes read that go to the loop at once (or fewer, when the socket runs dry): each
# hand-over wakes the loop, whose clients then send them.
HAND_OVER = SLOT // 2
# The smallest plain-http body written with O_DIRECT. A plain body's splice never
# enters the process (`proxyd.splicing`), and where the page cache's pages are warm it
# is the cheaper path: a cold GET took 0.32 s against 0.42 s at 256 MiB, 0.58 against
# 0.66 s at 512 MiB, but 1.89 against 1.37 s at 1 GiB and 11.1 against 5.7 s at 4 GiB
# (docs/performance.md). A TLS body is decrypted in the process either way, and sent
# from memory costs no more than from the page cache: every one is written so.
PLAIN_FROM = 1 << 30
ALIGN = 4096  # O_DIRECT's alignment of offsets, lengths and memory (a page: the safe one)


class Hash(Protocol):
    def update(self, data: memoryview, /) -> None: ...


# Bytes read into the view without waiting: the count; 0 at the body's end; None when
# the socket has nothing now (the caller waits for it, `splicing.wait_readable`).
Fill = Callable[[memoryview], int | None]


def open_direct(path: str) -> int | None:
    """A descriptor writing `path` with O_DIRECT, or None where the file system
    refuses it."""
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return None


def plain_reader(source: int) -> Fill:
    """Reads of the non-blocking socket `source`."""

    def fill(view: memoryview) -> int | None:
        try:
            return os.readv(source, [view])
        except BlockingIOError:
            return None

    return fill


@dataclass(frozen=True)
class Files:
    """The file being written: `direct` (O_DIRECT) for the aligned bytes, `buffered`
    for the tail and for all of it once the file system refused an aligned write."""

    direct: int
    buffered: int


def receive(
    fill: Fill,
    count: int,
    *,
    head: bytes,
    files: Files,
    hash: Hash,
    poller: select.poll,
    stop: splicing.Stop,
    timeout: float,
    arrived: Callable[[memoryview], None],
    written: Callable[[int, Callable[[], None]], None],
) -> None:
    """Write `head` then `count` bytes read by `fill` at the start of the empty file,
    hashing them in order; `arrived(view)` with the bytes as they are read (views of
    the slots, never written again; it may raise, to end the body: too slow),
    `written(n, release)` as each slot's n bytes reach the disk, in order, where the
    caller calls `release()` once it holds its views no more: a slot is in flight
    until then too (the loop that is sent the views may lag behind the disk; the
    slots then wait for it, not pile up). Blocks until both threads are done; raises
    what `fill` or `wait_readable` raised, ConnectionAbortedError on a body short of
    `count`, `splicing.Stopped` once `stop` is set, TimeoutError when no slot comes
    free for `timeout` seconds, and what writing raised."""
    total = len(head) + count
    ring = _Ring()
    memory = _Memory()
    holder = ring.follower()  # the caller, holding the views until `release`
    hasher = _Follower(ring, "proxyd-direct-hash", lambda view, _offset: hash.update(view))

    def on_write(size: int) -> None:
        written(size, functools.partial(ring.done, holder))

    writer = _Follower(ring, "proxyd-direct-write", _Writer(files, on_write))
    try:
        offset = 0  # of the slot being filled
        while offset < total:
            ring.wait_for_room(poller, stop, timeout)
            size = min(SLOT, total - offset)
            slot = memory.slot()[:size]
            filled = given = 0  # bytes in the slot; of them, handed to the loop
            if offset == 0 and head:
                slot[: len(head)] = head
                filled = len(head)
            while filled < size:
                got = fill(slot[filled:size])
                if got is None:  # the socket is dry: the loop has what came, meanwhile
                    if filled > given:
                        arrived(slot[given:filled])
                        given = filled
                    splicing.wait_readable(poller, stop, timeout)
                    continue
                if got == 0:
                    raise ConnectionAbortedError(
                        f"the connection closed after {offset + filled - len(head)} "
                        f"of {count} bytes"
                    )
                filled += got
                if filled - given >= HAND_OVER:
                    arrived(slot[given:filled])
                    given = filled
            if given < size:
                arrived(slot[given:size])
            ring.hand_over()
            hasher.follow(slot, offset)
            writer.follow(slot, offset)
            del slot  # (the followers and the loop hold it now)
            offset += size
            if splicing.told(poller, stop):  # a body that never waits ends when told, too
                raise splicing.Stopped
    except BaseException as exc:
        ring.fail(exc)
        raise
    finally:
        hasher.end()
        writer.end()
    ring.raise_failure()


class _Memory:
    """A body's slots, each used again once nothing holds a view of it: not the
    followers, nor the loop's clients (which may keep one for as long as their socket
    takes). Mapped memory of its own, page-aligned as O_DIRECT wants, kept for the
    body: from the heap, every freed slot stayed in its thread's arena (up to glibc's
    trim threshold, `proxyd.heap`), 10 MiB of the peak RSS; a new mapping for each
    slot cost its pages' faults (0.6 s of CPU a GiB). A slot the loop still holds
    when every kept one is held is a new mapping, freed with its last view."""

    def __init__(self) -> None:
        self._kept: list[mmap.mmap] = []

    def slot(self) -> memoryview:
        for memory in self._kept:
            if _unexported(memory):
                return memoryview(memory)
        memory = mmap.mmap(-1, SLOT, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if len(self._kept) < KEPT:
            self._kept.append(memory)
        return memoryview(memory)


def _unexported(memory: mmap.mmap) -> bool:
    """Whether no view of `memory` is alive: CPython's mmap refuses to be resized
    while one is (BufferError), even to its own size, which otherwise costs one
    mremap that moves nothing."""
    try:
        memory.resize(len(memory))
    except BufferError:
        return False
    return True


class _Ring:
    """How many slots are in flight (handed over, not yet done by the slower of the
    followers), at most `SLOTS`; a follower's failure ends the body."""

    def __init__(self) -> None:
        self._behind: list[int] = []  # each follower's slots not done yet
        self._changed = threading.Condition()
        self.failure: BaseException | None = None

    def wait_for_room(self, poller: select.poll, stop: splicing.Stop, timeout: float) -> None:
        """Until fewer than `SLOTS` are in flight, at most `timeout` seconds (a disk
        that takes no slot for that long is a stall, as a silent socket is; so is a
        caller that releases none); ends when told."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while max(self._behind, default=0) >= SLOTS:
                self.raise_failure()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no slot came free for {timeout:g} s (the disk stalls)")
                # (woken by each follower's slot done, or at the latest to look at `stop`)
                self._changed.wait(min(left, 0.05))
                if splicing.told(poller, stop):
                    raise splicing.Stopped
            self.raise_failure()

    def follower(self) -> int:
        """A new follower's number, for `done`."""
        self._behind.append(0)
        return len(self._behind) - 1

    def hand_over(self) -> None:
        with self._changed:
            self._behind = [behind + 1 for behind in self._behind]

    def done(self, follower: int) -> None:
        """`follower` is done with one more slot."""
        with self._changed:
            self._behind[follower] -= 1
            self._changed.notify()

    def fail(self, exc: BaseException) -> None:
        with self._changed:
            if self.failure is None:
                self.failure = exc
            self._changed.notify()

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure


class _Follower:
    """A thread doing one job to each slot handed over, in order (`work(view, offset)`);
    after a failure (its own or the body's) it only lets the slots go."""

    def __init__(self, ring: _Ring, name: str, work: Callable[[memoryview, int], None]) -> None:
        self._ring = ring
        self._number = ring.follower()
        self._work = work
        self._jobs: SimpleQueue[tuple[memoryview, int] | None] = SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def follow(self, slot: memoryview, offset: int) -> None:
        self._jobs.put((slot, offset))

    def end(self) -> None:
        """After the last slot: until the thread is done with every one."""
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            slot, offset = job
            try:
                if self._ring.failure is None:
                    self._work(slot, offset)
            except BaseException as exc:
                self._ring.fail(exc)
            finally:
                del job, slot  # the slot may be used again once nothing holds it
                self._ring.done(self._number)


class _Writer:
    """Writes each slot at its offset: the aligned part with O_DIRECT, the rest (the
    body's tail) through the ordinary descriptor."""

    def __init__(self, files: Files, written: Callable[[int], None]) -> None:
        self._files = files
        self._direct = True
        self._written = written

    def __call__(self, view: memoryview, offset: int) -> None:
        aligned = len(view) - len(view) % ALIGN if self._direct else 0
        if aligned:
            try:
                _write_at(self._files.direct, view[:aligned], offset)
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                self._direct = False  # the file system's alignment is not ours
                aligned = 0
        if aligned < len(view):
            _write_at(self._files.buffered, view[aligned:], offset + aligned)
        self._written(len(view))


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)
