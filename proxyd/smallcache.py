"""The cache of small responses: tag resolutions (with the manifest's bytes), tag
lists and referrers, each stored with the wall-clock time it was fetched.

Policy (TTL, revalidation, stale-if-error) lives in the pull core; this module only
stores JSON records. Storage is aiohttp-client-cache's `SQLiteCache` (a file in the
cache directory) or `RedisCache`, so several replicas behind one address share tag
state. Records are JSON, never pickle: a shared Redis must not be able to run code
in proxyd. A storage failure is logged and treated as a miss; the cache never fails
a request.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from aiohttp_client_cache.backends.base import BaseCache

log = structlog.get_logger("proxyd.smallcache")


class _JSON:
    """The serializer aiohttp-client-cache's storage calls `dumps`/`loads` on."""

    @staticmethod
    def dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()

    @staticmethod
    def loads(data: bytes | str) -> Any:
        return json.loads(data)


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


class SmallCache:
    def __init__(
        self,
        storage: BaseCache,
        clock: Callable[[], float] = time.time,
        pragmas: tuple[str, ...] = (),
    ) -> None:
        self._storage = storage
        self._clock = clock
        self._pragmas = pragmas

    @classmethod
    def sqlite(cls, path: Path, pragmas: tuple[str, ...] = SQLITE_PRAGMAS) -> SmallCache:
        from aiohttp_client_cache.backends.sqlite import SQLiteCache

        storage = SQLiteCache(str(path), "small_responses", serializer=_JSON())
        return cls(storage, pragmas=pragmas)

    @classmethod
    def redis(cls, url: str) -> SmallCache:
        from aiohttp_client_cache.backends.redis import RedisCache

        return cls(RedisCache("proxyd", "small_responses", address=url, serializer=_JSON()))

    async def open(self) -> None:
        """Set up the storage; a failure leaves it as it is (logged), still usable."""
        if not self._pragmas:
            return
        try:
            async with self._storage.get_connection() as db:  # type: ignore[attr-defined]
                for pragma in self._pragmas:
                    await db.execute(pragma)
        except Exception as exc:
            log.warning("smallcache.pragma_failed", error=str(exc))

    def now(self) -> float:
        return self._clock()

    async def get(self, key: str) -> Entry | None:
        try:
            raw = await self._storage.read(key)
        except Exception as exc:  # storage down: a miss, never a failed request
            log.warning("smallcache.unavailable", operation="read", error=str(exc))
            return None
        record = _JSON.loads(raw) if isinstance(raw, bytes | str) else raw
        if not isinstance(record, dict) or not isinstance(record.get("value"), dict):
            return None
        stored_at = record.get("stored_at")
        if not isinstance(stored_at, int | float):
            return None
        return Entry(record["value"], float(stored_at))

    async def put(self, key: str, value: dict[str, Any]) -> None:
        record = {"value": value, "stored_at": self._clock()}
        try:
            await self._storage.write(key, _JSON.dumps(record))
        except Exception as exc:
            log.warning("smallcache.unavailable", operation="write", error=str(exc))

    async def close(self) -> None:
        try:
            await self._storage.close()  # type: ignore[no-untyped-call]
        except Exception as exc:
            log.warning("smallcache.close_failed", error=str(exc))
