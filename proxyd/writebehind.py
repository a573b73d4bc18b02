"""Write-behind for a download: the event loop queues the chunks it reads from the
upstream, and a worker thread hashes and writes them, one batch at a time.

When no batch is in flight and at least `min_batch` bytes are queued, everything
queued goes to the worker as one job (one `writev`, one hash update per buffer), so
batches grow by themselves while the disk or the hash is the slower side. Below
`min_batch` the chunks wait for more: a hand-over per socket chunk (64 KiB from a
paced link, often less from a peer) cost the event loop a thread wake-up and a
completion callback each, 12-20% of a fleet node's Python time (docs/scale.md);
readers take bytes not yet on disk from memory meanwhile (`Download`), and `flush`
hands over whatever is left. The very first chunk is a batch written on the event
loop at its next turn: the requests waiting for the download's first bytes take them
from memory in that turn first (the time to first byte), and a thread hop would only
delay them. While more than `high_water` bytes wait, the reader of the upstream
waits in `room()`, so memory stays bounded whatever the blob's size. `on_written` is
told the new size of the file after every batch: only bytes on disk are ever
announced.

The writer belongs to the worker while a batch is in flight: `stop()` waits for it
before anyone may close the file (a descriptor closed under a running `writev` could
be reused by another file meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from proxyd.background import settle
from proxyd.store import BlobWriter, Buffer

# Bytes queued behind the batch in flight before the reader waits: 1 MiB was no
# faster, and held 0.5 MiB more at the peak (docs/performance.md).
HIGH_WATER = 1 << 19
MIN_BATCH = 256 << 10  # bytes queued before a batch goes to the worker (flush: any)


class WriteBehind:
    def __init__(
        self,
        writer: BlobWriter,
        on_written: Callable[[int], None],
        *,
        high_water: int = HIGH_WATER,
        min_batch: int = MIN_BATCH,
    ) -> None:
        self.writer = writer
        self.on_written = on_written  # the bytes now on disk, after each batch
        self.high_water = high_water
        self.min_batch = min(min_batch, high_water)  # reading waits only behind a batch
        self.written = 0
        self.backlog = 0  # bytes queued, not yet handed to the worker
        self._queue: list[Buffer] = []
        self._batch: asyncio.Future[int] | None = None
        self._error: BaseException | None = None
        self._waiters: list[asyncio.Future[None]] = []  # for the batch in flight to end
        self._stopped = False
        self._loop = asyncio.get_running_loop()

    def feed(self, chunk: Buffer) -> None:
        """Queue a chunk; it goes to the worker now if the worker is idle."""
        if self._error is not None:
            raise self._error
        if self._stopped:
            raise RuntimeError("write-behind fed after stop")
        if self.written == 0 and self._batch is None:
            # The first chunk: a batch of its own, written on the loop at its next turn.
            self._batch = self._loop.create_future()
            self._batch.add_done_callback(self._done)
            self._loop.call_soon(self._write_here, self._batch, [chunk])
            return
        self._queue.append(chunk)
        self.backlog += len(chunk)
        if self._batch is None and self.backlog >= self.min_batch:
            self._hand_over()

    async def room(self) -> None:
        """Wait while the queue is over the high-water mark (backpressure)."""
        while self.backlog > self.high_water and self._batch is not None:
            await self._next_batch()
        if self._error is not None:
            raise self._error

    async def flush(self) -> None:
        """Wait until every byte fed is written and hashed; raise the worker's error."""
        while True:
            if self._batch is None and self._queue and self._error is None:
                self._hand_over()  # the rest, short of `min_batch`
            if self._batch is None:
                break
            await self._next_batch()
        if self._error is not None:
            raise self._error

    async def _next_batch(self) -> None:
        """Until the batch in flight is accounted for (by `_done`, not merely finished:
        its future is done a moment before its callback has run)."""
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        await waiter

    async def stop(self) -> None:
        """Drop what is queued and wait for the batch in flight to end, even through
        cancellation (re-raised once it ended): after this the writer is the caller's
        again, to close."""
        self._stopped = True
        self._queue.clear()
        self.backlog = 0
        if self._batch is not None:
            with contextlib.suppress(Exception):  # its error: the download failed already
                await settle(self._batch)

    def _write_here(self, batch: asyncio.Future[int], buffers: list[Buffer]) -> None:
        if batch.done():  # cancelled: nothing may touch the writer any more
            return
        try:
            batch.set_result(self.writer.append(buffers))
        except Exception as exc:
            batch.set_exception(exc)

    def _hand_over(self) -> None:
        batch, self._queue = self._queue, []
        self.backlog = 0
        self._batch = self._loop.run_in_executor(None, self.writer.append, batch)
        self._batch.add_done_callback(self._done)

    def _done(self, batch: asyncio.Future[int]) -> None:
        self._batch = None
        error = asyncio.CancelledError() if batch.cancelled() else batch.exception()
        if error is not None:
            self._error = error
            self._queue.clear()
            self.backlog = 0
        else:
            self.written += batch.result()
            if self.backlog >= self.min_batch and not self._stopped:
                self._hand_over()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        if error is None:
            self.on_written(self.written)
