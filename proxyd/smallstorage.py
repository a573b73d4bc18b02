"""Where the small cache's records live: a table in a SQLite file in the cache
directory, or a hash in Redis that the replicas behind one address share. Each
stores bytes under a key and knows nothing of what they say (proxyd.smallcache
does: JSON records with the time they were fetched).

The layout is aiohttp-client-cache's, which proxyd used before: the table
`small_responses (key PRIMARY KEY, value)`, the Redis hash `proxyd:small_responses`;
a cache written by an earlier proxyd reads the same. proxyd has its own two small
classes because that library's package imports every backend it can, redis-py
among them (6-7 MiB of every daemon), and unittest.mock with its responses.
redis-py is imported when a `RedisStorage` is made (at startup, when configured).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiosqlite

if TYPE_CHECKING:
    from redis.asyncio import Redis

REDIS_HASH = "proxyd:small_responses"

CREATE = "CREATE TABLE IF NOT EXISTS small_responses (key PRIMARY KEY, value)"
READ = "SELECT value FROM small_responses WHERE key=?"
WRITE = "INSERT OR REPLACE INTO small_responses (key, value) VALUES (?, ?)"
PRUNE = (  # CASE, not OR: json_extract raises on what is not JSON
    "DELETE FROM small_responses WHERE CASE WHEN json_valid(CAST(value AS TEXT)) "
    "THEN IFNULL(json_extract(CAST(value AS TEXT), '$.stored_at'), 0) < ? ELSE 1 END"
)


class Storage(Protocol):
    async def open(self) -> None: ...

    async def read(self, key: str) -> bytes | None: ...

    async def write(self, key: str, value: bytes) -> None: ...

    async def prune(self, older_than: float) -> int:
        """Remove the records whose JSON `stored_at` is before `older_than`, and those
        that are not such JSON; how many went."""
        ...

    async def close(self) -> None: ...


class SQLiteStorage:
    """One aiosqlite connection (its own thread), opened at the first call; the
    table is made then if it is missing. `pragmas` run in `open()`."""

    def __init__(self, path: Path, pragmas: tuple[str, ...] = ()) -> None:
        self.path = path
        self.pragmas = pragmas
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()  # one caller opens the connection

    async def _connection(self) -> aiosqlite.Connection:
        if self._db is not None:  # every call after the first: no lock to take
            return self._db
        async with self._lock:
            if self._db is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = await aiosqlite.connect(self.path)
                try:
                    await db.execute(CREATE)
                except BaseException:
                    await db.close()
                    raise
                self._db = db
            return self._db

    async def open(self) -> None:
        db = await self._connection()
        for pragma in self.pragmas:
            await db.execute(pragma)

    async def read(self, key: str) -> bytes | None:
        db = await self._connection()
        async with db.execute(READ, (key,)) as cursor:
            row = await cursor.fetchone()
        return None if row is None else _as_bytes(row[0])

    async def write(self, key: str, value: bytes) -> None:
        db = await self._connection()
        await db.execute(WRITE, (key, value))
        await db.commit()

    async def prune(self, older_than: float) -> int:
        db = await self._connection()
        cursor = await db.execute(PRUNE, (older_than,))
        await db.commit()
        return int(cursor.rowcount)

    async def close(self) -> None:
        async with self._lock:
            db, self._db = self._db, None
            if db is not None:
                await db.close()


class RedisStorage:
    """One hash in Redis; every command bounded by `timeout` (redis-py's socket
    timeouts: pruning's many commands, each)."""

    def __init__(self, url: str, *, timeout: float) -> None:
        from redis.asyncio import Redis

        self.client: Redis = Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )

    async def open(self) -> None:
        pass  # connected at the first command

    async def read(self, key: str) -> bytes | None:
        value = await self.client.hget(REDIS_HASH, key)
        return None if value is None else _as_bytes(value)

    async def write(self, key: str, value: bytes) -> None:
        await self.client.hset(REDIS_HASH, key, value)

    async def prune(self, older_than: float) -> int:
        old = []
        async for key, raw in self.client.hscan_iter(REDIS_HASH, count=1000):
            if _stored_before(raw, older_than):
                old.append(key)
        for start in range(0, len(old), 1000):
            await self.client.hdel(REDIS_HASH, *old[start : start + 1000])
        return len(old)

    async def close(self) -> None:
        await self.client.aclose()


def _stored_before(raw: Any, older_than: float) -> bool:
    """Whether a record is older than `older_than`, or not a record at all."""
    try:
        stored_at = json.loads(raw).get("stored_at")
    except (ValueError, AttributeError):
        return True
    return not isinstance(stored_at, int | float) or stored_at < older_than


def _as_bytes(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)
