"""Time as proxyd reads it: one clock, chosen once (`create_app`, `open_core`) and
handed to the components that ask what time it is, so a test moves time forward
instead of waiting for it to pass.

Two readings, for two purposes. `monotonic()` measures intervals within one process
(token lifetimes, circuit cool-downs, upload idleness, memory deadlines): it never
jumps with the system clock. `time()` is the wall clock, the one to compare across
processes and against files: the small-response cache stores it (replicas sharing a
Redis read each other's records) and eviction compares it with blob files' mtimes.

Components take the reading they need as a plain callable (`clock=clock.monotonic`),
so on the system clock a reading is the `time` function itself, with nothing between.
A wait the core makes on purpose (a retry after `Retry-After`) is `sleep()` on the same
clock: a test's clock moves forward instead of waiting.
"""

from __future__ import annotations

import asyncio
import time as _time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds from an arbitrary start, never going back."""
        ...

    def time(self) -> float:
        """Seconds since the epoch, as other processes and the filesystem read them."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Until `seconds` have passed on this clock."""
        ...


class SystemClock:
    """The operating system's clocks."""

    monotonic = staticmethod(_time.monotonic)
    time = staticmethod(_time.time)
    sleep = staticmethod(asyncio.sleep)


SYSTEM_CLOCK: Clock = SystemClock()
