"""The background loops (eviction, upload expiry, credential reloads) end one way."""

from __future__ import annotations

import asyncio
import contextlib


async def stop_loop(task: asyncio.Task[None] | None) -> None:
    """Cancel a background loop and wait until it has unwound (its `finally` ran)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
