"""The cache of small responses: tag resolutions (with the manifest's bytes), tag
lists and referrers, each stored with the wall-clock time it was fetched.

Policy (TTL, revalidation, stale-if-error) lives in the pull core; this module only
stores JSON records, in a SQLite file in the cache directory or in Redis, so several
replicas behind one address share tag state (proxyd.smallstorage). Records are JSON,
never pickle: a shared Redis must not be able to run code in proxyd. A storage
failure is logged and treated as a miss; the cache never fails a request, and never
holds one up for long: with a `timeout` (Redis's, one second by default) a call that
has not answered by then is a failure, and the storage then counts as unreachable,
every call a miss at once, until it answers again (a call sent on the side every
`RETRY_EVERY` seconds, which no request waits for). A Redis frozen in the middle of a
call (SIGSTOP, a stalled network) costs the requests in flight that second, and
nothing after.

Records are rewritten whenever upstream is asked again, so `stored_at` is their last
use as far as upstream knows; `prune` removes those older than a cutoff (eviction's
`max_age`), and records that are not proxyd's JSON.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from proxyd.smallstorage import RedisStorage, SQLiteStorage, Storage

log = structlog.get_logger("proxyd.smallcache")


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Entry:
    value: dict[str, Any]
    stored_at: float  # seconds since the epoch: comparable between replicas

    def age(self, now: float) -> float:
        return max(0.0, now - self.stored_at)


# A write-ahead log synced only at checkpoints: a commit costs no fsync (a tag answer
# goes out a millisecond sooner, several under disk load). A power cut may lose the
# newest records, which are fetched again; it cannot leave a corrupt file.
SQLITE_PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL")


T = TypeVar("T")

RETRY_EVERY = 2.0  # seconds between the calls that find out whether storage is back


class SmallCache:
    def __init__(
        self,
        storage: Storage,
        clock: Callable[[], float] = time.time,
        *,
        timeout: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._storage = storage
        self._clock = clock
        self._timeout = timeout  # seconds a call may take; None: as long as it takes
        self._monotonic = monotonic
        self._retry_at: float | None = None  # unreachable: calls are misses until then
        self._probes: set[asyncio.Task[None]] = set()

    @classmethod
    def sqlite(
        cls,
        path: Path,
        pragmas: tuple[str, ...] = SQLITE_PRAGMAS,
        clock: Callable[[], float] = time.time,
    ) -> SmallCache:
        return cls(SQLiteStorage(path, pragmas), clock)

    @classmethod
    def redis(
        cls,
        url: str,
        clock: Callable[[], float] = time.time,
        *,
        timeout: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> SmallCache:
        """Every call bounded by `timeout`: a whole call by SmallCache, and each
        command's socket by redis-py (pruning's many commands, each)."""
        storage = RedisStorage(url, timeout=timeout)
        return cls(storage, clock, timeout=timeout, monotonic=monotonic)

    @property
    def reachable(self) -> bool:
        """False from a failed call until a call succeeds again."""
        return self._retry_at is None

    async def _call(
        self, operation: str, call: Callable[[], Awaitable[T]]
    ) -> tuple[bool, T | None]:
        """(True, the result) of `call()`, or (False, None) when it failed, timed out,
        or storage is unreachable (logged when it became so). While unreachable, a
        call due at RETRY_EVERY goes on the side and its caller does not wait."""
        if self._retry_at is not None:
            if self._monotonic() >= self._retry_at and not self._probes:
                task = asyncio.create_task(self._probe(operation, call))
                self._probes.add(task)
                task.add_done_callback(self._probes.discard)
            return False, None
        try:
            async with asyncio.timeout(self._timeout):
                return True, await call()
        except Exception as exc:  # storage down: a miss, never a failed request
            self._unreachable(operation, exc)
            return False, None

    async def _probe(self, operation: str, call: Callable[[], Awaitable[Any]]) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await call()
        except Exception:
            self._retry_at = self._monotonic() + RETRY_EVERY
            return
        self._retry_at = None
        log.info("smallcache.reachable", operation=operation)

    def _unreachable(self, operation: str, exc: BaseException) -> None:
        """Log a failed call; with a timeout (a storage across the network), the
        storage counts as unreachable from now on. A local file's failure (SQLite's)
        stays the one call's."""
        error = str(exc) or type(exc).__name__  # a timeout has no message
        if self._retry_at is None:
            log.warning("smallcache.unavailable", operation=operation, error=error)
        if self._timeout is not None:
            self._retry_at = self._monotonic() + RETRY_EVERY

    async def open(self) -> None:
        """Set up the storage; a failure leaves it as it is (logged), still usable."""
        try:
            await self._storage.open()
        except Exception as exc:
            log.warning(
                "smallcache.open_failed", storage=type(self._storage).__name__, error=str(exc)
            )

    def now(self) -> float:
        return self._clock()

    async def get(self, key: str) -> Entry | None:
        answered, raw = await self._call("read", lambda: self._storage.read(key))
        if not answered:
            return None
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except ValueError:  # not proxyd's record: a miss (pruning removes it)
            return None
        if not isinstance(record, dict) or not isinstance(record.get("value"), dict):
            return None
        stored_at = record.get("stored_at")
        if not isinstance(stored_at, int | float):
            return None
        return Entry(record["value"], float(stored_at))

    async def put(self, key: str, value: dict[str, Any], stored_at: float | None = None) -> None:
        """Store `value` as fetched now, or at `stored_at` (an answer added to a record
        whose age stands: it was not confirmed again)."""
        record = {"value": value, "stored_at": self._clock() if stored_at is None else stored_at}
        await self._call("write", lambda: self._storage.write(key, _dumps(record)))

    async def prune(self, older_than: float) -> int:
        """Remove the records stored before `older_than` (seconds since the epoch) and
        any that are not proxyd's; how many went (0 when the storage failed: logged).
        Not bounded as a whole (a large Redis hash takes many commands), only each
        command, by the storage's own socket timeout."""
        if self._retry_at is not None:
            return 0
        try:
            return await self._storage.prune(older_than)
        except Exception as exc:
            self._unreachable("prune", exc)
            return 0

    async def close(self) -> None:
        for probe in list(self._probes):
            probe.cancel()
        await asyncio.gather(*self._probes, return_exceptions=True)
        try:
            await self._storage.close()
        except Exception as exc:
            log.warning("smallcache.close_failed", error=str(exc))
