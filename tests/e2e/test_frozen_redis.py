"""A Redis that stops answering (SIGSTOP: its sockets stay open, the kernel still
accepts connections, nothing comes back) costs proxyd about a second, once: every
call to it is bounded by `[cache] redis_timeout`, and after a call that timed out
Redis counts as unreachable, every lookup a miss at once, until a call sent on the
side finds it answering again. A real redis-server, frozen and continued."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxyd.smallcache import RETRY_EVERY, SmallCache
from tests.conftest import FakeClock, host, origin, until
from tests.fakes import FakeRegistry, make_image
from tests.peers.redisserver import RedisServer

pytestmark = pytest.mark.peers

BOUND = 5.0  # seconds: what a call may take before the test calls it unbounded


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


async def timed(call: asyncio.Future[object] | object) -> tuple[object, float]:
    started = time.monotonic()
    result = await asyncio.wait_for(call, BOUND)  # type: ignore[arg-type]
    return result, time.monotonic() - started


async def test_a_frozen_redis_costs_one_timeout_then_nothing_until_it_answers(
    redis_server: RedisServer,
) -> None:
    clock = FakeClock()
    small = SmallCache.redis(redis_server.url, timeout=0.5, monotonic=clock.monotonic)
    try:
        await small.put("tag", {"digest": "sha256:" + "a" * 64})
        entry = await small.get("tag")
        assert entry is not None and small.reachable

        redis_server.freeze()
        missed, first = await timed(small.get("tag"))
        assert missed is None
        assert first < 2.0, f"a frozen Redis held a lookup {first:.2f} s"
        assert not small.reachable
        started = time.monotonic()
        for _ in range(10):
            assert await small.get("tag") is None
            await small.put("tag", {"digest": "sha256:" + "b" * 64})
        assert time.monotonic() - started < 0.5, "calls waited for an unreachable Redis"

        redis_server.resume()
        assert await small.get("tag") is None, "asked before RETRY_EVERY had passed"
        clock.advance(RETRY_EVERY)
        assert await small.get("tag") is None  # this call goes on the side
        await until(lambda: small.reachable)
        entry = await small.get("tag")
        assert entry is not None and entry.value["digest"] == "sha256:" + "a" * 64
    finally:
        redis_server.resume()
        await small.close()


async def test_requests_through_a_proxyd_whose_redis_froze_wait_a_second_at_most(
    redis_server: RedisServer, make_proxyd, start_fake
) -> None:
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    clock = FakeClock()
    proxyd = await make_proxyd(
        f'default_namespace = "{host(server)}"\n'
        f'[namespaces."{host(server)}"]\nserver = "{origin(server)}"\ntag_ttl = 0.5\n'
        f'[cache]\nbackend = "redis"\nredis_url = "{redis_server.url}"\n',
        clock=clock,
    )
    try:
        assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 200
        redis_server.freeze()
        durations = []
        for _ in range(6):
            clock.advance(1.5)  # past the tag's freshness and its memory: Redis is asked
            response, seconds = await timed(proxyd.get("/v2/team/app/manifests/v1"))
            assert response.status == 200  # type: ignore[attr-defined]
            assert await response.read() == image.manifest  # type: ignore[attr-defined]
            durations.append(seconds)
        assert durations[0] < 3.0, f"the first lookup took {durations[0]:.2f} s"
        assert max(durations[1:]) < 1.0, f"later lookups waited: {durations}"
    finally:
        redis_server.resume()
