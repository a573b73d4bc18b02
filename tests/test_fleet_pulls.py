"""Blobs through the fleet (proxyd.fleetpull): a node that lacks a blob asks the
directory in Redis where to take it from, so a cold blob crosses the upstream link
once for the whole fleet; a peer that fails (wrong bytes, a refusal, a 404, a closed
port, a stream cut midway) is skipped for another source; Redis unreachable leaves
each node to work alone. Nodes are real proxyd apps on 127.0.0.1, each on its own
port (the one it advertises) with its own cache, sharing a real redis-server; the
fake peers are small aiohttp apps answering as `proxyd.server.peers` does."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import unused_port
from structlog.testing import capture_logs

from proxyd.config import load_settings
from proxyd.reference import Digest
from proxyd.runtime import build_runtime
from proxyd.server import AccessLogger, create_app
from proxyd.server.keys import FLEET, METRICS
from tests.conftest import ProxydTestServer, host, until, until_stored
from tests.fakes import FakeRegistry, make_image
from tests.peers.proxyd import CLOSED_PORT_URL
from tests.peers.redisserver import RedisServer
from tests.test_pull import upstream_config

SECRET = "the-fleets-secret-0123456789"
LAYER = bytes(range(256)) * 4096  # 1 MiB
BOOT = "f00dfeedf00dfeed"  # the fake peers' boot id in the directory


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
async def fleet(aiohttp_client, start_fake, redis_server, tmp_path):
    """`await fleet.node()`: one more node in front of `fleet.upstream` (an image whose
    layer is LAYER, its blob bodies held before the last byte while the gate is
    closed), in the redis-server's fleet (or `redis_url`'s); `chain`: more lines of
    the namespace's table (hosts ahead of the upstream)."""
    assert redis_server.command("FLUSHALL") == "+OK"
    secret = tmp_path / "peer-secret"
    secret.write_text(SECRET)
    upstream = FakeRegistry(gate=asyncio.Event())
    upstream.gate.set()
    image = upstream.add(make_image(layer=LAYER))
    server = await start_fake(upstream)

    class Fleet:
        pass

    made = Fleet()
    made.upstream, made.image, made.nodes = upstream, image, []  # type: ignore[attr-defined]
    made.upstream_host = host(server)  # type: ignore[attr-defined]

    async def node(redis_url: str | None = None, chain: tuple[str, ...] = ()) -> Any:
        n = len(made.nodes)  # type: ignore[attr-defined]
        port = unused_port()
        cluster = [
            "[cluster]",
            f'redis_url = "{redis_url or redis_server.url}"',
            f'advertise = "http://127.0.0.1:{port}"',
            f'secret_file = "{secret}"',
            "fanout = 2",
            "timeout = 0.5",
        ]
        path = tmp_path / f"proxyd-{n}.toml"
        path.write_text(upstream_config(server, *chain, *cluster))
        cache = tmp_path / f"cache-{n}"
        runtime = build_runtime(load_settings(path, cache_dir=cache))
        app_server = ProxydTestServer(create_app(runtime), host="127.0.0.1", port=port)
        await app_server.start_server(access_log_class=AccessLogger)
        client = await aiohttp_client(app_server)
        client.cache, client.url = cache, f"http://127.0.0.1:{port}"
        made.nodes.append(client)  # type: ignore[attr-defined]
        return client

    made.node = node  # type: ignore[attr-defined]
    return made


def blob_gets(upstream: FakeRegistry, digest: str) -> int:
    return sum(1 for s in upstream.requests(f"blobs/{digest}") if s.method == "GET")


def metric(node: Any, name: str, *labels: str) -> float:
    counter = getattr(node.server.app[METRICS], name)
    value: float = (counter.labels(*labels) if labels else counter)._value.get()
    return value


async def pull(node: Any, digest: str) -> bytes:
    response = await node.get(f"/v2/team/app/blobs/{digest}")
    assert response.status == 200, await response.text()
    body: bytes = await response.read()
    return body


def register(
    redis: RedisServer, digest: str, url: str, *, boot: str = BOOT, load: int = 0, depth: int = 0
) -> None:
    """Put `url` in the directory as a live source of `digest` (a holder at depth 0,
    else a node receiving it that deep in the tree), feeding `load` peers, as
    `Directory.holding` or `Directory.source` would."""
    base = f"proxyd:fleet:blob:{digest}:"
    assert redis.command("SET", f"proxyd:fleet:node:{url}", boot) == "+OK"
    if depth == 0:
        redis.command("HSET", base + "held", url, boot)
    redis.command("HSET", base + "load", url, f"{depth} {load} {boot}")
    redis.command("ZADD", base + "tree", str(depth * 1048576 + load), url)


async def fake_peer(aiohttp_server: Any, answer: Any) -> str:
    """A peer endpoint answering every blob request with `answer(request)`."""
    app = web.Application()

    async def handle(request: web.Request) -> web.StreamResponse:
        result: web.StreamResponse = await answer(request)
        return result

    app.router.add_get("/_proxyd/peers/blobs/{digest}", handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    return f"http://127.0.0.1:{server.port}"


async def test_a_cold_blob_is_fetched_from_the_upstream_once_for_the_whole_fleet(fleet):
    a, b, c = [await fleet.node() for _ in range(3)]
    layer = fleet.image.layer
    fleet.upstream.gate.clear()  # the upstream holds the last byte back
    first = await a.get(f"/v2/team/app/blobs/{layer}")
    assert len(await first.content.read(1000)) == 1000

    others = asyncio.gather(pull(b, layer), pull(c, layer))
    await asyncio.sleep(0.3)  # b and c stream from the fleet meanwhile
    fleet.upstream.gate.set()

    assert await first.read() == LAYER[1000:]
    assert await others == [LAYER, LAYER]
    assert blob_gets(fleet.upstream, layer) == 1
    for node in (a, b, c):
        assert (await until_stored(node.cache, layer)).read_bytes() == LAYER
    saved = [metric(node, "upstream_saved_bytes") for node in (a, b, c)]
    assert saved == [0, len(LAYER), len(LAYER)]
    received = [metric(node, "peer_received_bytes") for node in (a, b, c)]
    assert received == [0, len(LAYER), len(LAYER)]
    directory = a.server.app[FLEET].directory
    everyone = sorted(node.url for node in (a, b, c))

    async def all_hold() -> bool:
        held = await directory.some_holders(Digest.parse(layer), len(everyone) + 1)
        return sorted(held) == everyone

    await until(all_hold)  # each tells the directory once its copy is stored


async def test_a_peer_that_sends_wrong_bytes_is_skipped_counted_and_named(
    fleet, redis_server, aiohttp_server
):
    """From a peer's download in flight (streamed as it arrives), the client streaming
    them is cut short before the last byte (it has no way to take the wrong ones
    back); the download starts again from the upstream."""

    async def wrong(request: web.Request) -> web.Response:
        return web.Response(body=LAYER[::-1])

    liar = await fake_peer(aiohttp_server, wrong)
    node = await fleet.node()
    register(redis_server, fleet.image.layer, liar)

    with capture_logs() as logs:
        first = await node.get(f"/v2/team/app/blobs/{fleet.image.layer}")
        with pytest.raises(aiohttp.ClientPayloadError):  # cut short: never a wrong body
            await first.read()
        await until_stored(node.cache, fleet.image.layer)  # the download went on upstream

    assert await pull(node, fleet.image.layer) == LAYER
    assert metric(node, "peer_failures", "digest") == 1
    assert any(e["event"] == "peer.digest_mismatch" and e["peer"] == liar for e in logs)
    assert blob_gets(fleet.upstream, fleet.image.layer) == 1
    assert (await until_stored(node.cache, fleet.image.layer)).read_bytes() == LAYER


async def test_wrong_bytes_of_a_peers_stored_copy_cut_no_client(
    fleet, redis_server, aiohttp_server
):
    """A stored copy (`X-Proxyd-Cache: hit`) is withheld until verified: a corrupt one
    costs the client a wait, then the upstream's bytes."""

    async def corrupt_copy(request: web.Request) -> web.Response:
        return web.Response(body=LAYER[::-1], headers={"X-Proxyd-Cache": "hit"})

    liar = await fake_peer(aiohttp_server, corrupt_copy)
    node = await fleet.node()
    register(redis_server, fleet.image.layer, liar)

    with capture_logs() as logs:
        assert await pull(node, fleet.image.layer) == LAYER  # one answer, never cut
        stored = await until_stored(node.cache, fleet.image.layer)

    assert metric(node, "peer_failures", "digest") == 1
    assert any(e["event"] == "peer.digest_mismatch" and e["peer"] == liar for e in logs)
    assert blob_gets(fleet.upstream, fleet.image.layer) == 1
    assert metric(node, "upstream_saved_bytes") == 0
    assert stored.read_bytes() == LAYER  # the peer's bytes were not kept, nor left in tmp/
    assert list((node.cache / "tmp").iterdir()) == []


async def refuse(request: web.Request) -> web.Response:
    return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)


async def missing(request: web.Request) -> web.Response:
    return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)


async def broken(request: web.Request) -> web.Response:
    return web.Response(status=503)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [(refuse, "refused"), (missing, "missing"), (broken, "unavailable"), (None, "connection")],
    ids=["refuses", "404", "503", "dead"],
)
async def test_a_peer_that_fails_is_skipped_for_the_upstream(
    fleet, redis_server, aiohttp_server, answer, reason
):
    peer = CLOSED_PORT_URL if answer is None else await fake_peer(aiohttp_server, answer)
    node = await fleet.node()
    register(redis_server, fleet.image.layer, peer)

    assert await pull(node, fleet.image.layer) == LAYER

    assert metric(node, "peer_failures", reason) == 1
    assert blob_gets(fleet.upstream, fleet.image.layer) == 1


async def test_a_stream_cut_midway_goes_on_from_another_peer_at_the_byte_it_reached(
    fleet, redis_server, aiohttp_server
):
    async def half_then_gone(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = len(LAYER)
        await response.prepare(request)
        await response.write(LAYER[: len(LAYER) // 2])
        assert request.transport is not None
        request.transport.abort()
        return response

    holder = await fleet.node()
    assert await pull(holder, fleet.image.layer) == LAYER
    await until_stored(holder.cache, fleet.image.layer)
    boot = holder.server.app[FLEET].directory.boot
    register(redis_server, fleet.image.layer, holder.url, boot=boot, load=1)  # asked second
    dying = await fake_peer(aiohttp_server, half_then_gone)
    register(redis_server, fleet.image.layer, dying)
    node = await fleet.node()

    assert await pull(node, fleet.image.layer) == LAYER  # one answer, never cut

    assert metric(node, "peer_failures", "connection") == 1
    assert blob_gets(fleet.upstream, fleet.image.layer) == 1  # the holder's, long before
    assert metric(holder, "peer_sent_bytes") == len(LAYER) - len(LAYER) // 2
    assert metric(node, "upstream_saved_bytes") == len(LAYER) - len(LAYER) // 2


async def test_after_a_peer_failed_no_deeper_peer_is_asked(fleet, redis_server, aiohttp_server):
    """A deeper node may be one this node feeds: each would wait on the other."""
    asked: list[str] = []

    async def deeper(request: web.Request) -> web.Response:
        asked.append(request.path)
        return web.Response(body=LAYER)

    refusing = await fake_peer(aiohttp_server, refuse)
    below = await fake_peer(aiohttp_server, deeper)
    node = await fleet.node()
    register(redis_server, fleet.image.layer, refusing)
    register(redis_server, fleet.image.layer, below, depth=1)

    assert await pull(node, fleet.image.layer) == LAYER

    assert asked == []
    assert metric(node, "peer_failures", "refused") == 1
    assert blob_gets(fleet.upstream, fleet.image.layer) == 1


async def test_a_peer_serves_no_repository_the_upstream_did_not_confirm(fleet):
    a, b = await fleet.node(), await fleet.node()
    assert await pull(a, fleet.image.layer) == LAYER
    await until_stored(a.cache, fleet.image.layer)

    elsewhere = await b.get(f"/v2/team/other/blobs/{fleet.image.layer}")

    assert elsewhere.status == 404
    assert metric(a, "peer_sent_bytes") == 0
    assert blob_gets(fleet.upstream, fleet.image.layer) == 1


async def test_with_redis_unreachable_each_node_pulls_alone(fleet):
    closed = CLOSED_PORT_URL.replace("http", "redis")
    a, b = await fleet.node(redis_url=closed), await fleet.node(redis_url=closed)

    assert [await pull(a, fleet.image.layer), await pull(b, fleet.image.layer)] == [LAYER] * 2

    assert blob_gets(fleet.upstream, fleet.image.layer) == 2
    assert metric(a, "fleet_sources", "alone") == 1
    assert (await until_stored(b.cache, fleet.image.layer)).read_bytes() == LAYER
