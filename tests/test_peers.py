"""A fleet node's peer endpoint (`/_proxyd/peers/blobs/<digest>`) and the client that
asks it (proxyd.peers): a peer with the fleet's secret gets a blob this node holds or
is downloading, at most `fanout` peers at a time per blob; without the secret it gets
nothing; a peer that fails is said why. (What a peer sends is verified, and wrong
bytes counted, logged with the peer's address and never kept, on the way a node takes
a blob from a peer: tests/test_fleet_pulls.py.) Nodes are real proxyd apps on
127.0.0.1 with a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from proxyd.metrics import Metrics
from proxyd.peers import PeerClient, PeerFailed, peer_host
from proxyd.reference import Digest
from proxyd.server.keys import METRICS
from tests.conftest import oci_code, until_stored
from tests.fakes import FakeRegistry, make_image
from tests.peers.proxyd import CLOSED_PORT_URL
from tests.peers.redisserver import RedisServer
from tests.test_pull import upstream_config

SECRET = "the-fleets-secret-0123456789"
LAYER = b"a layer of the fleet " * 50_000  # about 1 MiB


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "peer-secret"
    path.write_text(SECRET + "\n")
    return path


def fleet_config(server: object, redis_url: str, secret_file: Path, **cluster: Any) -> str:
    table = {
        "redis_url": redis_url,
        "advertise": "http://127.0.0.1:5999",
        "secret_file": str(secret_file),
        **cluster,
    }
    lines = [f"{key} = {value!r}".replace("'", '"') for key, value in table.items()]
    return upstream_config(server, "[cluster]", *lines)


def with_secret(secret: str = SECRET) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def peer_url(proxyd: Any) -> str:
    return f"http://127.0.0.1:{proxyd.server.port}"


@pytest.fixture
async def node(make_proxyd, start_fake, redis_server, secret_file):
    """A fleet node in front of a fake upstream holding one image (`node.image`)."""
    upstream = FakeRegistry(gate=asyncio.Event())
    upstream.gate.set()
    image = upstream.add(make_image(layer=LAYER))
    server = await start_fake(upstream)
    proxyd = await make_proxyd(fleet_config(server, redis_server.url, secret_file, fanout=2))
    proxyd.upstream, proxyd.image = upstream, image
    return proxyd


async def stored_on(proxyd: Any, cache_dir: Path, digest: str) -> None:
    response = await proxyd.get(f"/v2/team/app/blobs/{digest}")
    assert response.status == 200
    await response.read()
    await until_stored(cache_dir, digest)


# -- the endpoint ---------------------------------------------------------------------------


async def test_a_peer_with_the_secret_gets_a_blob_this_node_holds(node, cache_dir):
    layer = node.image.layer
    await stored_on(node, cache_dir, layer)

    whole = await node.get(f"/_proxyd/peers/blobs/{layer}", headers=with_secret())
    part = await node.get(
        f"/_proxyd/peers/blobs/{layer}", headers={**with_secret(), "Range": "bytes=10-"}
    )

    assert whole.status == 200
    assert await whole.read() == LAYER
    assert whole.headers["Docker-Content-Digest"] == layer
    assert part.status == 206
    assert await part.read() == LAYER[10:]
    head = await node.head(f"/_proxyd/peers/blobs/{layer}", headers=with_secret())
    assert (head.status, head.headers["Content-Length"]) == (200, str(len(LAYER)))
    metrics = node.server.app[METRICS]
    assert metrics.peer_sent_bytes._value.get() == 2 * len(LAYER) - 10


@pytest.mark.parametrize(
    "headers",
    [{}, with_secret("not-the-fleets-secret-0123"), {"Authorization": f"Basic {SECRET}"}],
    ids=["none", "wrong", "basic"],
)
async def test_a_peer_without_the_secret_gets_nothing_and_the_secret_is_never_logged(
    node, cache_dir, headers
):
    layer = node.image.layer
    await stored_on(node, cache_dir, layer)

    with capture_logs() as logs:
        refused = await node.get(f"/_proxyd/peers/blobs/{layer}", headers=headers)
        assert refused.status == 401
        assert await oci_code(refused) == "UNAUTHORIZED"
        allowed = await node.get(f"/_proxyd/peers/blobs/{layer}", headers=with_secret())
        await allowed.read()

    assert "WWW-Authenticate" not in refused.headers  # nothing to negotiate
    assert SECRET not in repr(logs)


async def test_a_peer_joins_a_download_in_flight(node):
    upstream, layer = node.upstream, node.image.layer
    upstream.gate.clear()  # the upstream holds the last byte back
    client = await node.get(f"/v2/team/app/blobs/{layer}")
    assert len(await client.content.read(1000)) == 1000

    peer = await node.get(f"/_proxyd/peers/blobs/{layer}", headers=with_secret())
    assert peer.status == 200
    assert peer.headers["X-Proxyd-Cache"] == "miss"  # not verified yet when it joined
    assert len(await peer.content.readexactly(len(LAYER) - 1)) == len(LAYER) - 1
    upstream.gate.set()

    assert await peer.read() == LAYER[-1:]
    assert len(upstream.requests(f"/blobs/{layer}")) == 1


async def test_a_blob_this_node_lacks_is_404_and_is_not_fetched_for_the_peer(node):
    layer = node.image.layer

    missing = await node.get(f"/_proxyd/peers/blobs/{layer}", headers=with_secret())

    assert missing.status == 404
    assert await oci_code(missing) == "BLOB_UNKNOWN"
    assert node.upstream.requests("/blobs/") == []


async def test_at_most_fanout_peers_stream_one_blob_at_once(node):
    upstream, layer = node.upstream, node.image.layer
    upstream.gate.clear()
    client = await node.get(f"/v2/team/app/blobs/{layer}")
    await client.content.read(1000)
    path = f"/_proxyd/peers/blobs/{layer}"
    first, second = [await node.get(path, headers=with_secret()) for _ in range(2)]
    assert (first.status, second.status) == (200, 200)

    third = await node.get(path, headers=with_secret())  # fanout = 2

    assert third.status == 429
    assert await oci_code(third) == "TOOMANYREQUESTS"
    upstream.gate.set()
    assert await first.read() and await second.read()
    again = await node.get(path, headers=with_secret())
    assert again.status == 200


async def test_a_malformed_digest_is_the_peers_400(node):
    response = await node.get("/_proxyd/peers/blobs/sha256:nope", headers=with_secret())
    assert response.status == 400
    assert await oci_code(response) == "DIGEST_INVALID"


async def test_without_a_cluster_table_there_is_no_peer_endpoint(make_proxyd, start_fake):
    server = await start_fake(FakeRegistry())
    proxyd = await make_proxyd(upstream_config(server))
    response = await proxyd.get(f"/_proxyd/peers/blobs/{Digest.of(b'x')}")
    assert response.status == 404


async def test_a_node_whose_redis_is_unreachable_serves_and_stays_ready(
    make_proxyd, start_fake, secret_file, cache_dir
):
    upstream = FakeRegistry()
    image = upstream.add(make_image(layer=LAYER))
    server = await start_fake(upstream)
    closed = CLOSED_PORT_URL.replace("http", "redis")
    with capture_logs() as logs:
        proxyd = await make_proxyd(fleet_config(server, closed, secret_file, timeout=0.5))
        ready = await proxyd.get("/readyz")
        await stored_on(proxyd, cache_dir, image.layer)
    assert ready.status == 200
    metrics = (await (await proxyd.get("/metrics")).read()).decode()
    assert "proxyd_fleet_redis_up 0.0" in metrics
    assert [e["event"] for e in logs].count("fleet.redis_unavailable") == 1


async def test_a_node_is_in_the_directory_while_it_serves_and_leaves_when_it_stops(
    make_proxyd, start_fake, redis_server, secret_file
):
    assert redis_server.command("FLUSHALL") == "+OK"
    server = await start_fake(FakeRegistry())
    proxyd = await make_proxyd(fleet_config(server, redis_server.url, secret_file, ttl=30.0))
    key = "proxyd:fleet:node:http://127.0.0.1:5999"
    assert 0 < int(redis_server.command("PTTL", key).lstrip(":")) <= 30_000

    await proxyd.close()

    assert redis_server.command("EXISTS", key) == ":0"


# -- the client -----------------------------------------------------------------------------


@pytest.fixture
async def peers():
    metrics = Metrics()
    async with PeerClient(SECRET.encode(), metrics=metrics, read_timeout=1.0) as client:
        yield client


async def test_a_stream_from_a_peer_resumes_at_an_offset(node, cache_dir, peers):
    layer = node.image.layer
    await stored_on(node, cache_dir, layer)

    async with peers.open(peer_url(node), Digest.parse(layer), offset=1000) as up:
        rest = await up.response.read()

    assert up.host == peer_host(peer_url(node), read_timeout=1.0)
    assert rest == LAYER[1000:]


async def test_a_peer_that_fails_is_said_why(node, aiohttp_server, redis_server, peers):
    layer = Digest.parse(node.image.layer)  # not stored on the node: missing

    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"a first byte, then nothing")
        await asyncio.Event().wait()  # cancelled when the server stops
        return response

    app = web.Application()
    app.router.add_get("/_proxyd/peers/blobs/{digest}", stall)
    stalled = f"http://127.0.0.1:{(await aiohttp_server(app, host='127.0.0.1')).port}"
    wrong = PeerClient(b"not-the-fleets-secret", metrics=peers.metrics)

    async def reason(client: PeerClient, peer: str) -> str:
        with pytest.raises(PeerFailed) as failed:
            async with client.open(peer, layer) as up:
                await up.response.read()
        assert failed.value.peer == peer
        return failed.value.reason

    async with wrong:
        assert await reason(wrong, peer_url(node)) == "refused"
    assert await reason(peers, peer_url(node)) == "missing"
    assert await reason(peers, CLOSED_PORT_URL) == "connection"
    assert await reason(peers, stalled) == "timeout"
    reasons = ("refused", "missing", "connection", "timeout")
    counted = {r: peers.metrics.peer_failures.labels(r)._value.get() for r in reasons}
    assert counted == dict.fromkeys(reasons, 1)


def test_a_peer_is_a_pull_only_host_at_its_endpoint():
    host = peer_host("http://10.0.0.5:5000")
    assert host.url(f"blobs/{Digest.of(b'x')}") == (
        f"http://10.0.0.5:5000/_proxyd/peers/blobs/{Digest.of(b'x')}"
    )
    assert host.is_mirror
    assert host.capabilities.names() == ["pull"]
