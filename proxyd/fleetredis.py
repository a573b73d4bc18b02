"""The fleet's one connection to Redis, and the rule every call through it follows:
bounded by `[cluster] timeout`, and a Redis that fails or is slow is no error of the
request but `RedisUnreachable`, on which each caller goes on alone (as a proxyd
without a fleet would). Redis coordinates the fleet; it never holds the only copy of
anything a pull needs, so every caller has a way on without it.

An outage is logged once as it starts (`fleet.redis_unavailable`) and once as it
ends (`fleet.redis_back`), not at every call, and `proxyd_fleet_redis_up` shows it;
`proxyd_fleet_redis_errors_total` counts the calls it cost. The URL is logged without
its password.

redis-py is imported when a `FleetRedis` is made (at startup, with `[cluster]`), not
with this module: the modules that name it are on every node's import path, and
redis-py is 6-7 MiB of a node's memory that only a fleet uses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import structlog

from proxyd.metrics import Metrics

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

log = structlog.get_logger("proxyd.fleet")

T = TypeVar("T")


class RedisUnreachable(Exception):
    """Redis did not answer in time, or failed: the caller goes on alone."""


class FleetRedis:
    def __init__(self, url: str, *, timeout: float, metrics: Metrics) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError

        self._errors = (RedisError, OSError, TimeoutError)  # a failure, not a bug
        self.timeout = timeout
        self.metrics = metrics
        self.where = _without_password(url)
        # No retries of its own: a call gets one try within `timeout`, and the next
        # call tries again (a fleet call is never worth more than its deadline).
        self.client: Redis = Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._up: bool | None = None  # unknown until the first call
        metrics.fleet_redis_up.set(0)

    @property
    def up(self) -> bool:
        """Whether the last call was answered."""
        return self._up is True

    def script(self, source: str) -> AsyncScript:
        """A Lua script (sent by its SHA, its text only when Redis lacks it)."""
        return self.client.register_script(source)

    async def call(self, operation: str, run: Callable[[Redis], Awaitable[T]]) -> T:
        """`run(client)` within the timeout; RedisUnreachable when it fails.

        redis-py's asyncio client can swallow a cancellation that arrives in the middle
        of a command (the command then completes): a caller cancelled meanwhile is
        cancelled here, so that a background loop stopped during a call does stop."""
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            async with asyncio.timeout(self.timeout):
                result = await run(self.client)
        except self._errors as exc:
            self._failed(operation, exc)
            raise RedisUnreachable(f"{self.where}: {_describe(exc)}") from None
        finally:
            if task is not None and task.cancelling() > cancels:
                raise asyncio.CancelledError
        self._answered()
        return result

    async def run_script(
        self, operation: str, script: AsyncScript, keys: list[str], args: list[Any]
    ) -> Any:
        return await self.call(operation, lambda client: script(keys=keys, args=args))

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except self._errors as exc:
            log.debug("fleet.redis_close_failed", error=_describe(exc))

    def _failed(self, operation: str, exc: BaseException) -> None:
        self.metrics.fleet_redis_errors.labels(operation).inc()
        self.metrics.fleet_redis_up.set(0)
        if self._up is not False:
            log.warning(
                "fleet.redis_unavailable",
                redis=self.where,
                operation=operation,
                error=_describe(exc),
                note="this node works alone until Redis answers again",
            )
        self._up = False

    def _answered(self) -> None:
        if self._up is not True:
            if self._up is False:
                log.info("fleet.redis_back", redis=self.where)
            self.metrics.fleet_redis_up.set(1)
        self._up = True


def _without_password(url: str) -> str:
    """`host:port/db` of a Redis URL: what the log may say of it."""
    parts = urlsplit(url)
    where = parts.hostname or "?"
    if parts.port:
        where += f":{parts.port}"
    return where + parts.path


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
