"""The fleet's directory (proxyd.directory) against a real redis-server: one node of
the fleet fetches a cold blob, every other node is sent to a peer that holds it or
is receiving it, in a tree no wider than `fanout` at any node; a node that dies stops
counting within the TTL; Redis unreachable leaves each node alone."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import pytest
from structlog.testing import capture_logs

from proxyd.directory import ALONE, Directory, blob_keys, node_key
from proxyd.fleetredis import FleetRedis
from proxyd.metrics import Metrics
from proxyd.reference import Digest
from tests.conftest import until
from tests.peers.proxyd import CLOSED_PORT_URL
from tests.peers.redisserver import RedisServer

BLOB = Digest.of(b"a layer the whole fleet wants")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


class Fleet:
    """Directories of nodes `http://node-N:5000`, each with its own connection."""

    def __init__(self, url: str, *, fanout: int = 3, ttl: float = 5.0) -> None:
        self.url, self.fanout, self.ttl = url, fanout, ttl
        self.opened: list[FleetRedis] = []

    async def node(self, n: int, *, timeout: float = 2.0, metrics: Metrics | None = None):
        redis = FleetRedis(self.url, timeout=timeout, metrics=metrics or Metrics())
        self.opened.append(redis)
        directory = Directory(redis, me=f"http://node-{n}:5000", fanout=self.fanout, ttl=self.ttl)
        await directory.heartbeat()
        return directory

    async def nodes(self, count: int) -> list[Directory]:
        return [await self.node(n) for n in range(count)]

    async def close(self) -> None:
        for redis in self.opened:
            await redis.close()


@pytest.fixture
async def fleet(redis_server: RedisServer) -> AsyncIterator[Fleet]:
    assert redis_server.command("FLUSHALL") == "+OK"
    made = Fleet(redis_server.url)
    yield made
    await made.close()


async def test_exactly_one_of_many_nodes_asking_at_once_fetches_a_cold_blob(fleet: Fleet):
    nodes = await fleet.nodes(10)

    sources = await asyncio.gather(*(node.source(BLOB) for node in nodes))

    assert [s.kind for s in sources].count("fetch") == 1
    fetcher = nodes[[s.kind for s in sources].index("fetch")]
    peers = {s.peer for s in sources if s.kind == "peer"}
    assert len([s for s in sources if s.kind == "peer"]) == 9
    assert fetcher.me in peers  # the first ones stream from the fetcher as bytes arrive
    assert peers <= {node.me for node in nodes}


async def test_no_node_feeds_more_than_fanout_peers_and_the_tree_is_shallow(fleet: Fleet):
    fleet.fanout = 3
    nodes = await fleet.nodes(40)

    sources = [await node.source(BLOB) for node in nodes]

    assert sources[0].kind == "fetch"
    fed = Counter(s.peer for s in sources[1:])
    assert max(fed.values()) <= 3
    # Every node was sent to one that was already receiving it (asked before it).
    order = {node.me: i for i, node in enumerate(nodes)}
    assert all(order[s.peer] < i for i, s in enumerate(sources) if s.peer)
    # Breadth first: 1 + 3 + 9 + 27 nodes fill depths 0 to 3.
    assert max(s.depth for s in sources) == 3 < math.log(40, 3)


async def test_a_peer_done_with_frees_its_place_for_the_next_node(fleet: Fleet):
    fleet.fanout = 1
    a, b, c, d = await fleet.nodes(4)
    assert (await a.source(BLOB)).kind == "fetch"
    assert (await b.source(BLOB)).peer == a.me
    assert (await c.source(BLOB)).peer == b.me  # a is full

    await b.done_with(BLOB, a.me)

    assert (await d.source(BLOB)).peer == a.me


async def test_holders_serve_nodes_that_come_later_once_the_tree_is_gone(
    fleet: Fleet, redis_server: RedisServer
):
    a, b, c = await fleet.nodes(3)
    assert (await a.source(BLOB)).kind == "fetch"
    await a.holding(BLOB)
    assert redis_server.command("EXISTS", blob_keys(BLOB)[3]) == ":0"  # the fetch is over
    assert await a.some_holders(BLOB, 8) == [a.me]
    assert (await b.source(BLOB)).peer == a.me
    tree, load, *_ = blob_keys(BLOB)
    redis_server.command("DEL", tree, load)  # as when it expires, long after the crowd

    assert (await c.source(BLOB)).peer == a.me


async def test_a_node_that_dies_stops_counting_within_its_ttl(
    fleet: Fleet, redis_server: RedisServer
):
    fleet.ttl = 1.0
    a, b = await fleet.nodes(2)
    assert (await a.source(BLOB)).kind == "fetch"
    assert (await b.source(BLOB)).peer == a.me
    ttl_ms = int(redis_server.command("PTTL", node_key(a.me)).lstrip(":"))
    assert 0 < ttl_ms <= 1000

    # a dies (no heartbeat, no goodbye); b renews its own.
    async def a_is_gone() -> bool:
        await b.heartbeat()
        return redis_server.command("EXISTS", node_key(a.me)) == ":0"

    await until(a_is_gone, within=5.0)

    late = await fleet.node(2)
    assert (await late.source(BLOB)).peer == b.me  # b receives it still; a is no source
    await b.dropped(BLOB)  # b's transfer from a broke off
    assert (await (await fleet.node(3)).source(BLOB)).peer == late.me


async def test_the_fetch_of_a_node_that_died_goes_to_the_next_node_asking(
    fleet: Fleet, redis_server: RedisServer
):
    a, b = await fleet.nodes(2)
    assert (await a.source(BLOB)).kind == "fetch"
    redis_server.command("DEL", node_key(a.me))  # a's liveness expired

    assert (await b.source(BLOB)).kind == "fetch"


async def test_a_node_that_stops_leaves_at_once(fleet: Fleet):
    a, b = await fleet.nodes(2)
    a.start()
    assert (await a.source(BLOB)).kind == "fetch"
    await a.holding(BLOB)

    await a.stop()

    assert await b.some_holders(BLOB, 8) == []
    assert (await b.source(BLOB)).kind == "fetch"


async def test_a_restarted_node_is_not_taken_for_what_it_held_before(fleet: Fleet):
    before = await fleet.node(1)
    await before.holding(BLOB)
    after = await fleet.node(1)  # the same URL, a new process

    assert await after.some_holders(BLOB, 8) == []
    assert (await (await fleet.node(2)).source(BLOB)).kind == "fetch"


async def test_a_node_avoiding_a_bad_peer_is_sent_elsewhere_or_upstream(fleet: Fleet):
    a, b, c = await fleet.nodes(3)
    assert (await a.source(BLOB)).kind == "fetch"
    assert (await b.source(BLOB)).peer == a.me

    # c was sent wrong bytes by a: it may still take them from b ...
    assert (await c.source(BLOB, avoid=[a.me])).peer == b.me
    # ... and, avoiding both, goes to the upstream itself, a keeping the fetch.
    upstream = await c.source(BLOB, avoid=[a.me, b.me])
    assert upstream.kind == "upstream"


async def test_the_right_to_fetch_is_renewed_while_the_fetch_runs(
    fleet: Fleet, redis_server: RedisServer
):
    fleet.ttl = 1.0
    a, b = await fleet.nodes(2)
    assert (await a.source(BLOB)).kind == "fetch"
    fetch_key = blob_keys(BLOB)[3]

    redis_server.command("PEXPIRE", fetch_key, "60000")  # a renewal sets it back to 1 s

    async with a.fetching(BLOB):

        async def renewed() -> bool:
            await a.heartbeat()
            return int(redis_server.command("PTTL", fetch_key).lstrip(":")) <= 1000

        await until(renewed, within=5.0)
        assert (await b.source(BLOB)).peer == a.me


async def test_redis_unreachable_leaves_each_node_alone_logged_once():
    metrics = Metrics()
    redis = FleetRedis(CLOSED_PORT_URL.replace("http", "redis"), timeout=0.5, metrics=metrics)
    node = Directory(redis, me="http://node-1:5000", fanout=3, ttl=5.0)
    try:
        with capture_logs() as logs:
            assert await node.heartbeat() is False
            assert await node.source(BLOB) == ALONE
            assert await node.source(BLOB) == ALONE
            await node.holding(BLOB)  # nothing to record it in: no error either
    finally:
        await redis.close()
    assert [e["event"] for e in logs if e["event"].startswith("fleet.")] == [
        "fleet.redis_unavailable"
    ]
    assert metrics.fleet_redis_up._value.get() == 0
    assert metrics.fleet_redis_errors.labels("source")._value.get() == 2
    assert metrics.fleet_sources.labels("alone")._value.get() == 2


async def test_a_redis_that_stalls_is_waited_for_no_longer_than_the_timeout(
    fleet: Fleet, redis_server: RedisServer
):
    metrics = Metrics()
    node = await fleet.node(1, metrics=metrics)
    assert metrics.fleet_redis_up._value.get() == 1
    assert redis_server.command("CLIENT", "PAUSE", "10000", "WRITE") == "+OK"
    node.redis.timeout = 0.3  # the other calls keep 2 s, for a loaded machine
    try:
        with capture_logs() as logs:
            async with asyncio.timeout(5):
                assert await node.source(BLOB) == ALONE  # a script writes: paused
        assert metrics.fleet_redis_up._value.get() == 0
    finally:
        assert redis_server.command("CLIENT", "UNPAUSE") == "+OK"
        node.redis.timeout = 2.0
    with capture_logs() as back:
        assert (await node.source(BLOB)).kind == "fetch"
    assert metrics.fleet_sources.labels("fetch")._value.get() == 1
    assert [e["event"] for e in logs + back if e["event"].startswith("fleet.")] == [
        "fleet.redis_unavailable",
        "fleet.redis_back",
    ]
    assert metrics.fleet_redis_up._value.get() == 1


def test_keys_of_a_blob_are_named_by_its_digest():
    assert blob_keys(BLOB)[3] == f"proxyd:fleet:blob:{BLOB}:fetch"
    assert node_key("http://10.0.0.5:5000") == "proxyd:fleet:node:http://10.0.0.5:5000"


async def test_some_holders_are_a_few_live_ones_however_many_hold_it(
    fleet: Fleet, redis_server: RedisServer
):
    nodes = await fleet.nodes(6)
    for node in nodes:
        await node.holding(BLOB)
    redis_server.command("DEL", node_key(nodes[0].me))  # dead: never named
    some = await nodes[1].some_holders(BLOB, 3)
    assert len(some) <= 3 and set(some) <= {n.me for n in nodes[1:]}
    assert sorted(await nodes[1].some_holders(BLOB, 10)) == sorted(n.me for n in nodes[1:])
