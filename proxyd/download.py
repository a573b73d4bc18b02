"""One upstream fetch of a blob, streamed to any number of readers as it arrives.

A download writes a temporary file while hashing it: through a write-behind, in a
worker thread; or, for a big body, by a worker thread that takes it from the socket
(`splice`): written with O_DIRECT, its bytes held in memory for the readers until
they are on disk; or, where the file system refuses O_DIRECT, spliced (plain http)
or decrypted (TLS) into the page cache and hashed from the file. Each client
streams the bytes as they come, from memory until they are on disk and from the
file after. The blob's last byte is held back until the digest
is verified, so a client never receives a complete wrong body; a mismatch cuts every
reader short and keeps nothing. A range ends on the same terms: its own last byte
waits for the digest too, so no answer, whole or partial, ends clean on bytes the
digest has not vouched for.

A reader whose client sits on a plain socket takes the bytes on disk as spans of
the temporary file (`OnDisk`), which the server sends with sendfile, from the page
cache to the socket without a copy through Python: all of a spliced body's bytes,
and a write-behind's or an O_DIRECT body's for a reader behind the disk (which for
O_DIRECT reads the disk: those bytes are in no page cache). A caught-up reader takes
what is not on disk yet from memory, as every reader does (waiting for the disk
instead cost the loop more CPU than sendfile saved: docs/performance.md).

A download whose source fails midway (a peer of the fleet, `proxyd.fleetpull`) may
go on from its next source at the byte it reached, or `restart` from the first byte:
then readers that had bytes are cut short (those bytes may be what made the digest
fail), and readers that had none go on with the new bytes. A download from a peer's
stored copy (which crosses the node network at its speed, not the upstream's)
`withhold`s every byte until the digest is verified, so that a corrupt copy costs
its readers a wait, not a cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from proxyd import splicing
from proxyd.background import settle
from proxyd.errors import UpstreamError
from proxyd.hosts import Target
from proxyd.reference import Digest
from proxyd.store import BlobStore, BlobWriter
from proxyd.upstream import RawBody
from proxyd.writebehind import WriteBehind

# Bytes a reader behind the disk preads at once: a slow client's chunk waits in the
# socket's send buffer as a copy too, so 1 MiB here was 2 MiB of the peak RSS.
READ_CHUNK = 1 << 18
Held = bytes | memoryview  # bytes a reader takes from memory


@dataclass(frozen=True)
class OnDisk:
    """Bytes [offset, offset + length) of the blob, in `file` (the reader's own
    descriptor of the temporary or the stored file, open until the reader ends)."""

    file: io.FileIO
    offset: int
    length: int


class Download:
    """One upstream fetch of a blob, streamed to any number of readers.

    Chunks from upstream go through a write-behind (hashed and written in a worker
    thread). Readers pread the temporary file, and take what has not reached it yet
    from the chunks still queued for it; the blob's last byte only once the digest is
    verified. The fsync and rename into the store follow the release of the last
    byte; until they are done the download stays registered, and a request arriving
    meanwhile joins it.
    """

    def __init__(self, digest: Digest, target: Target) -> None:
        self.digest = digest
        self.target = target  # the repository whose GET confirms the digest
        self.generation = 0  # restarts from the first byte so far
        self.stored: Path | None = None  # where the blob was renamed to
        self.error: BaseException | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._users = 1  # the download itself; each reader adds one
        self._reset()

    def _reset(self) -> None:
        """What a start from the first byte holds: a new download's, and a restarted
        one's. Only the download's identity, its readers (`_users`, `_waiters`) and
        what outlives an attempt (`generation`; `stored` and `error`, which end it)
        are kept elsewhere."""
        self.size: int | None = None
        self.host = ""
        self.peer: str | None = None  # the fleet's node the bytes come from, if any
        self.withhold = False  # every byte waits for the digest (a peer's stored copy)
        self.received = 0  # bytes read from upstream
        self.verified = False  # the digest matched: readers may have every byte
        self.writer: BlobWriter | None = None
        self._pipe: WriteBehind | None = None
        self._spliced = 0  # bytes a splice put in the file (no write-behind then)
        # (offset, chunk) not on disk yet: aiohttp's bytes, or views of an O_DIRECT
        # body's memory (never written again)
        self._unwritten: deque[tuple[int, Held]] = deque()
        self._fd = -1  # the temporary file, for readers
        self._answered = False  # upstream answered the GET, or the download failed first

    def answer(self) -> None:
        """Upstream answered the GET, or (`error` set) the download failed first: the
        requests waiting for that resume at the loop's next turn, before the first
        chunk's disk write (which `WriteBehind` leaves to that turn)."""
        self._answered = True
        self.notify()

    async def answered(self) -> None:
        """Until upstream answered; raises the download's failure, if it failed. A
        request cancelled meanwhile ends its own wait, not the download."""
        while not self._answered:
            await self._news()
        if self.error is not None:
            raise self.error

    @property
    def written(self) -> int:
        """Bytes on disk: what readers may pread (but the last byte, until verified)."""
        return self._pipe.written if self._pipe is not None else self._spliced

    def open(self, store: BlobStore) -> None:
        """Create the temporary file, and the descriptor readers pread (once)."""
        if self.writer is not None:
            return
        writer = store.writer(self.digest)
        try:
            self._fd = os.open(writer.temp_path, os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            writer.close()
            raise
        self.writer = writer

    def open_early(self, store: BlobStore) -> None:
        """`open` while upstream has yet to answer; if it fails, `open` meets (and
        raises) the same failure once upstream answered."""
        with contextlib.suppress(OSError):
            self.open(store)

    async def write(self, chunk: bytes) -> None:
        """Queue a chunk for the disk; wait while too much is queued already."""
        if self._pipe is None:
            assert self.writer is not None, "the download writes once it is open"
            self._pipe = WriteBehind(self.writer, self._advance)
        self._unwritten.append((self.received, chunk))
        self.received += len(chunk)
        self._pipe.feed(chunk)
        self.notify()  # readers caught up take it from memory
        if self._pipe.backlog > self._pipe.high_water:
            await self._pipe.room()

    async def splice(self, body: RawBody) -> None:
        """Take a body straight from its socket, in a worker thread: into the file with
        O_DIRECT, its bytes held in memory for the clients until they are on disk
        (`BlobWriter.receive`), or, where the file system refuses O_DIRECT, spliced or
        decrypted into the page cache (`BlobWriter.splice`); announcing what arrives as
        it does. Cancelled, the thread is told to stop and waited for (the socket and
        the file stay open until it ended). Raises what the thread raised."""
        writer = self.writer
        assert writer is not None, "the download writes once it is open"
        # `written` counts the write-behind's bytes or the thread's: never both.
        assert self._pipe is None and self.received == 0, "a splice takes a blob whole"
        loop = asyncio.get_running_loop()
        unpaced = len(body.head)  # (counted by the pace already)

        def arrived(chunk: memoryview) -> None:  # in the worker thread
            nonlocal unpaced
            body.pace.arrived(len(chunk) - unpaced)
            unpaced = 0
            loop.call_soon_threadsafe(self._arrived, chunk)

        def written(size: int, release: Callable[[], None]) -> None:  # in the worker thread
            loop.call_soon_threadsafe(self._written, size, release)

        def moved(size: int) -> None:  # in the worker thread
            body.pace.arrived(size)
            loop.call_soon_threadsafe(self._landed, size)

        def take() -> None:
            received = writer.receive(
                body.fd,
                body.head,
                body.left,
                timeout=body.timeout,
                stop=stop,
                arrived=arrived,
                written=written,
                tls=body.tls,
            )
            if received:
                return
            if body.head:  # what aiohttp had read: a batch of its own, here
                writer.append([body.head])
                loop.call_soon_threadsafe(self._landed, len(body.head))
            writer.splice(
                body.fd, body.left, timeout=body.timeout, stop=stop, moved=moved, tls=body.tls
            )

        stop = splicing.Stop()
        own = ThreadPoolExecutor(1, thread_name_prefix="proxyd-splice")  # (splicing.py)
        try:
            job = loop.run_in_executor(own, take)
            own.shutdown(wait=False)  # the thread ends with its one job
            await settle(job, on_cancel=stop.set)
        finally:
            stop.close()

    def _arrived(self, chunk: memoryview) -> None:
        """A taken body's next bytes, read and on their way to the disk: readers may
        have them from memory."""
        self._unwritten.append((self.received, chunk))
        self.received += len(chunk)
        self.notify()

    def _written(self, size: int, release: Callable[[], None]) -> None:
        """`size` more bytes of a taken body are on disk: the memory that held them is
        let go (but by readers sending it)."""
        self._spliced += size
        self._advance(self._spliced)
        release()

    def _landed(self, size: int) -> None:
        """`size` more bytes of a spliced body are in the file."""
        self._spliced += size
        self.received = self._spliced
        self.notify()

    async def verify(self) -> None:
        """Once every byte is on disk: check the digest, then release the last byte."""
        if self._pipe is not None:
            await self._pipe.flush()
        assert self.writer is not None, "the download verifies once it is open"
        if self.size is not None and self.written != self.size:
            raise UpstreamError(f"{self.host} sent {self.written} of {self.size} bytes")
        self.writer.verify()  # raises DigestMismatch, keeping nothing
        self.verified = True
        self.notify()

    async def discard(self) -> None:
        """After a failure: let the worker thread finish with the file, then drop it."""
        try:
            if self._pipe is not None:
                await self._pipe.stop()
        finally:
            if self.writer is not None:
                self.writer.close()

    async def restart(self) -> None:
        """Drop every byte so far and start again at the first (from another source),
        as a new download would (`_reset`): readers that had bytes are cut short at
        their next read, the others wait for the new ones, and a request yet to be
        answered for the new source's answer. The caller opens the download again."""
        await self.discard()
        if self._fd >= 0:
            os.close(self._fd)
        self._reset()
        self.generation += 1
        self.notify()

    def _advance(self, written: int) -> None:
        """The write-behind put `written` bytes on disk: readers may pread them now."""
        unwritten = self._unwritten
        while unwritten and unwritten[0][0] + len(unwritten[0][1]) <= written:
            unwritten.popleft()
        self.notify()

    def _unwritten_bytes(self, offset: int, limit: int) -> Held:
        """Bytes from `offset` (at or past what is on disk), up to `limit`, from the
        chunk queued for the disk that holds them."""
        for start, chunk in self._unwritten:
            if start <= offset < start + len(chunk):
                if offset == start and start + len(chunk) <= limit:
                    return chunk
                return chunk[offset - start : limit - start]
        raise UpstreamError(f"bytes at {offset} of {self.digest} are neither on disk nor held")

    def _releasable(self) -> int:
        """How many bytes readers may have now: all once verified; before that all but
        the blob's last byte. With the size known, only the final byte itself waits;
        without it any byte may be the last, so the newest one waits (and every chunk
        then goes out in two pieces)."""
        if self.verified:
            return self.received
        if self.withhold:
            return 0
        if self.size is not None and self.received < self.size:
            return self.received
        return self.received - 1

    async def _news(self) -> None:
        """Until the next `notify` (a waiter of its own: cancelling it ends only this
        wait)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def release(self) -> None:
        self._users -= 1
        if self._users == 0 and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def chunks(self, start: int = 0, stop: int | None = None) -> AsyncIterator[bytes]:
        """Bytes [start, stop) of the blob as they arrive; raises if the download
        fails. Until the digest is verified, the blob's last byte is withheld, and so
        is `stop`'s last byte: a range short of the end completes only once the whole
        blob is verified (holding back the blob's last byte alone would protect only
        the ranges that include it). A `restart` after this reader had bytes raises."""
        async with contextlib.aclosing(self.pieces(start, stop)) as pieces:
            async for piece in pieces:
                assert not isinstance(piece, OnDisk), "asked for bytes only"
                yield piece if isinstance(piece, bytes) else bytes(piece)

    async def pieces(
        self, start: int = 0, stop: int | None = None, *, spans: bool = False
    ) -> AsyncGenerator[Held | OnDisk, None]:
        """`chunks`, on the same terms; with `spans`, bytes on disk come as `OnDisk`
        spans of the file instead of read."""
        ended = self._users == 0  # the download itself let go: stored, or dropped
        self._users += 1
        offset = start
        generation = self.generation
        file: io.FileIO | None = None  # this reader's descriptor, for spans
        try:
            if self._fd < 0 and self.error is None and ended:
                # The download ended between handing this reader out and its first read.
                if self.stored is None:
                    raise UpstreamError(f"the download of {self.digest} was not kept")
                self._fd = os.open(self.stored, os.O_RDONLY | os.O_CLOEXEC)
            while stop is None or offset < stop:
                if self.error is not None:
                    raise UpstreamError(f"download of {self.digest} failed: {self.error}")
                if generation != self.generation:
                    if offset > start:
                        raise UpstreamError(f"download of {self.digest} started again")
                    generation = self.generation
                    if file is not None:
                        file.close()  # the old file's
                        file = None
                available = self._releasable()
                if stop is not None:
                    available = min(available, stop if self.verified else stop - 1)
                piece: Held | OnDisk
                if offset < available and offset < self.written:
                    on_disk = min(available, self.written)
                    if spans:
                        if file is None:
                            file = io.FileIO(os.dup(self._fd), "rb")
                        piece = OnDisk(file, offset, on_disk - offset)
                    else:
                        piece = os.pread(self._fd, min(READ_CHUNK, on_disk - offset), offset)
                        if not piece:  # the file is shorter than written: never spin on it
                            raise UpstreamError(f"temporary file of {self.digest} was truncated")
                elif offset < available:
                    piece = self._unwritten_bytes(offset, available)
                elif self.verified:
                    return
                else:
                    await self._news()
                    continue
                offset += piece.length if isinstance(piece, OnDisk) else len(piece)
                yield piece
        finally:
            if file is not None:
                file.close()
            self.release()
