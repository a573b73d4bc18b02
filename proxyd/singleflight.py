"""Single-flight: concurrent callers with the same key share one call.

Used for everything that goes upstream (tag revalidations, manifests, tokens), so N
clients asking at once cost one upstream request. The entry disappears when the call
ends, so there is nothing to clean up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class SingleFlight(Generic[V]):
    def __init__(self, on_join: Callable[[], None] = lambda: None) -> None:
        self._calls: dict[Hashable, asyncio.Future[V]] = {}
        self._on_join = on_join  # a caller shared another's call (a metric counts them)

    async def run(self, key: Hashable, call: Callable[[], Awaitable[V]]) -> V:
        future = self._calls.get(key)
        if future is None:
            future = asyncio.ensure_future(call())
            self._calls[key] = future
            future.add_done_callback(lambda done: self._finished(key, done))
        else:
            self._on_join()
        # shield: one caller giving up must not cancel the call the others wait for
        return await asyncio.shield(future)

    def _finished(self, key: Hashable, future: asyncio.Future[V]) -> None:
        if self._calls.get(key) is future:
            del self._calls[key]
        if not future.cancelled():
            future.exception()  # retrieved here: the callers re-raise it themselves

    def __contains__(self, key: Hashable) -> bool:
        return key in self._calls
