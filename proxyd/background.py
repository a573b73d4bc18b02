"""Work done beside the requests, off the event loop's way: in a worker thread
(`in_worker`, waited for to its end even when its caller is cancelled, since a thread
cannot be stopped) and in background loops (eviction, upload expiry, credential
reloads), which all end one way (`stop_loop`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def settle(job: asyncio.Future[T], on_cancel: Callable[[], None] | None = None) -> T:
    """The result of a worker-thread job, waiting for its end even when cancelled
    meanwhile (a thread cannot be stopped: what it holds must stay open until it ends;
    `on_cancel` may ask it to end early). A cancellation is re-raised once the job
    ended."""
    cancelled = False
    while not job.done():
        try:
            await asyncio.wait([job])
        except asyncio.CancelledError:
            if not cancelled and on_cancel is not None:
                on_cancel()
            cancelled = True
    if cancelled:
        if not job.cancelled():
            job.exception()  # retrieved: the cancellation is what the caller sees
        raise asyncio.CancelledError
    return job.result()


async def in_worker(work: Callable[..., T], *args: Any) -> T:
    """`work(*args)` in a worker thread, waited for to its end even when cancelled
    (see `settle`): what it holds stays its own until it returns."""
    return await settle(asyncio.get_running_loop().run_in_executor(None, work, *args))


async def stop_loop(task: asyncio.Task[None] | None) -> None:
    """Cancel a background loop and wait until it has unwound (its `finally` ran)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
